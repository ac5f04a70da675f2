"""PEFT's other inits ("orthogonal", "pissa", "pissa_niter_N", "olora"): factors, residual base,
DoRA magnitude, merge and the rank-2r LoRA export for the original base, against numpy
formulas and (where installed) HF PEFT on the same torch weights."""

import copy
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import dora_jax
from dora_jax.variants import lora as vlora
from test_core import MLP, rand

BASE_MODIFYING = ["pissa", "pissa_niter_3", "olora"]


def _params(seed=0):
  x = jnp.asarray(rand(7, 4))
  params = MLP().init(jax.random.key(seed), x)["params"]
  return jax.tree.map(lambda t: t + 0.1 * jnp.asarray(rand(*t.shape)), params), x


def _cfg(init, use_dora=False, **kw):
  kw = {"r": 2, "lora_alpha": 3.0, **kw}
  return dora_jax.LoraConfig(target_modules=["up", "down"], use_dora=use_dora,
                             init_lora_weights=init, **kw)


def np_truncated(w, r):
  u, s, vh = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  return (u[:, :r] * s[:r]) @ vh[:r]


def np_olora_product(w, r):
  """``Q_r R_r`` of torch's weight ``[O, I] = Wᵀ = Q R``, transposed back to ``[I, O]``."""
  q, rr = np.linalg.qr(np.asarray(w, np.float64).T)
  return (q[:, :r] @ rr[:r]).T


def np_rsvd(x, omega, niter):
  """Halko et al. 2011 Alg. 4.4 in numpy (the reference for ``pissa_niter_N``)."""
  x = np.asarray(x, np.float64)
  q, _ = np.linalg.qr(x @ omega)
  for _ in range(niter):
    q, _ = np.linalg.qr(x.T @ q)
    q, _ = np.linalg.qr(x @ q)
  u, s, vh = np.linalg.svd(q.T @ x, full_matrices=False)
  return (q @ u) * s @ vh


def np_merged(w_res, a, b, s, m=None):
  v = np.asarray(w_res, np.float64) + s * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return v if m is None else v * np.asarray(m) / np.linalg.norm(v, axis=0)


# ---------------------------------------------------------------------------
# Against numpy


@pytest.mark.parametrize("init", BASE_MODIFYING)
@pytest.mark.parametrize("use_dora", [False, True])
def test_residual_factors_and_magnitude(init, use_dora):
  params, _ = _params()
  cfg = _cfg(init, use_dora)
  res, ad = dora_jax.init_adapters_and_base(jax.random.key(1), params, cfg)
  s = cfg.scale
  for name in ("up", "down"):
    w0 = np.asarray(params[name]["kernel"], np.float64)
    a, b = np.asarray(ad[name]["lora_a"], np.float64), np.asarray(ad[name]["lora_b"], np.float64)
    prod = s * a @ b
    if init == "olora":
      want = s * np_olora_product(w0, 2)  # OLoRA: s·Q_r R_r (PEFT does not divide by s)
      np.testing.assert_allclose(b @ b.T, np.eye(2), atol=1e-5)  # B = Q_rᵀ: orthonormal rows
    elif init == "pissa":
      want = np_truncated(w0, 2)  # PiSSA: the top-2 singular part
    else:  # the randomized SVD from the module's documented key fold_in(key, crc32(path))
      k = jax.random.fold_in(jax.random.key(1), zlib.crc32(name.encode()) & 0x7FFFFFFF)
      want = np_rsvd(w0, np.asarray(jax.random.normal(k, (w0.shape[1], 2)), np.float64), 3)
    if init != "olora":
      np.testing.assert_allclose(a.T @ a, np.diag(np.diag(a.T @ a)), atol=1e-4)  # A = U sqrt(S/s)
    np.testing.assert_allclose(prod, want, atol=1e-5)
    np.testing.assert_allclose(res[name]["kernel"], w0 - prod, atol=1e-6)
    if use_dora:
      np.testing.assert_allclose(ad[name]["magnitude"], np.linalg.norm(w0, axis=0), rtol=1e-6)
  np.testing.assert_array_equal(res["up"]["bias"], params["up"]["bias"])
  # The adapted model starts equal to the base: merge on the residual gives W0 back.
  merged = dora_jax.merge(res, ad, cfg)
  for name in ("up", "down"):
    np.testing.assert_allclose(merged[name]["kernel"], params[name]["kernel"], atol=1e-5)


def test_randomized_svd_matches_numpy_halko():
  x = jnp.asarray(rand(9, 7))
  key = jax.random.key(3)
  omega = np.asarray(jax.random.normal(key, (7, 3), jnp.float32), np.float64)  # the same Ω
  for niter in (0, 2):
    u, s, vh = vlora.randomized_svd(key, x, 3, niter)
    np.testing.assert_allclose(np.asarray(u * s @ vh), np_rsvd(x, omega, niter), atol=2e-5)


def test_orthogonal_init():
  params, x = _params()
  cfg = _cfg("orthogonal", use_dora=True, r=4, rank_pattern={"down": 2})
  ad = dora_jax.init_adapters(jax.random.key(2), params, cfg)
  for name, r in (("up", 4), ("down", 2)):
    a, b = np.asarray(ad[name]["lora_a"], np.float64), np.asarray(ad[name]["lora_b"], np.float64)
    assert a.shape[1] == r and b.shape[0] == r and np.abs(a).max() > 1e-3 and np.abs(b).max() > 1e-3
    np.testing.assert_allclose(a @ b, 0.0, atol=1e-7)  # ΔW = 0: the base is left as it is
    assert np.linalg.matrix_rank(a, tol=1e-6) == r // 2  # A = G Q[0::2] / 10
    np.testing.assert_allclose(ad[name]["magnitude"], np.linalg.norm(params[name]["kernel"], axis=0),
                               rtol=1e-6)
  base = MLP().apply({"params": params}, x)
  np.testing.assert_allclose(dora_jax.wrap(MLP().apply, cfg)(params, ad, x), base, atol=1e-6)
  with pytest.raises(ValueError, match="even rank"):
    _cfg("orthogonal", r=3)
  with pytest.raises(ValueError, match="even rank"):
    _cfg("orthogonal", r=2, rank_pattern={"up": 3})


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_merge_and_conversion_to_lora_on_original_base(init):
  params, x = _params()
  cfg = _cfg(init, use_dora=True, rank_pattern={"up": 3}, alpha_pattern={"down": 5.0})
  res, ad0 = dora_jax.init_adapters_and_base(jax.random.key(1), params, cfg)
  ad = jax.tree.map(lambda t: t + 0.2 * jnp.asarray(rand(*t.shape)), ad0)  # "trained"
  merged = dora_jax.merge(res, ad, cfg)
  conv, cfg2 = dora_jax.convert_to_lora(ad, ad0, cfg)
  assert (cfg2.r, cfg2.lora_alpha, cfg2.init_lora_weights) == (4, 6.0, True)
  assert dict(cfg2.rank_pattern) == {"up": 6} and dict(cfg2.alpha_pattern) == {"down": 10.0}
  assert conv["up"]["lora_a"].shape == (4, 6) and conv["down"]["lora_b"].shape == (4, 5)
  merged2 = dora_jax.merge(params, conv, cfg2)  # on the ORIGINAL base
  for name in ("up", "down"):
    s = cfg.for_module(name).scale
    a = ad[name]
    want = np_merged(res[name]["kernel"], a["lora_a"], a["lora_b"], s, a["magnitude"])
    np.testing.assert_allclose(merged[name]["kernel"], want, atol=1e-5)
    np.testing.assert_allclose(merged2[name]["kernel"], want, atol=1e-5)
  y = dora_jax.wrap(MLP().apply, cfg)(res, ad, x)
  np.testing.assert_allclose(dora_jax.wrap(MLP().apply, cfg2)(params, conv, x), y, atol=1e-5)


def test_refusals(tmp_path):
  params, _ = _params()
  cfg = _cfg("pissa")
  with pytest.raises(ValueError, match="init_adapters_and_base"):
    dora_jax.init_adapters(jax.random.key(0), params, cfg)
  res, ad = dora_jax.init_adapters_and_base(jax.random.key(0), params, cfg)
  with pytest.raises(ValueError, match="initial_adapters="):
    dora_jax.export_peft(tmp_path, ad, cfg, params=res)
  with pytest.raises(ValueError, match="without initial_adapters"):
    plain = _cfg(True)
    dora_jax.export_peft(tmp_path, dora_jax.init_adapters(jax.random.key(0), params, plain), plain,
                         params=params, initial_adapters=ad)
  with pytest.raises(ValueError, match="use_rslora"):
    dora_jax.convert_to_lora(ad, ad, _cfg("pissa", use_rslora=True, rank_pattern={"up": 2}))
  with pytest.raises(ValueError, match="init_lora_weights must be"):
    _cfg("pissa_niter_x")
  conv = {"conv": {"kernel": jnp.ones((3, 3, 4, 6))}, "emb": {"embedding": jnp.ones((10, 6))}}
  layouts = {"conv": dora_jax.KernelLayout(0, 3, kind="conv")}
  for init in ("olora", "orthogonal"):
    for target in ("conv", "emb"):
      c = dora_jax.LoraConfig(r=2, target_modules=[target], init_lora_weights=init)
      with pytest.raises(ValueError, match="Linear-type modules only"):
        dora_jax.init_adapters_and_base(jax.random.key(0), conv, c, layouts=layouts)
  q = {**params, "up": {**params["up"], "kernel": dora_jax.quant.quantize_int8(params["up"]["kernel"])}}
  with pytest.raises(ValueError, match="quantized"):
    dora_jax.init_adapters_and_base(jax.random.key(0), q, cfg)


def test_scanned_kernels_per_layer():
  w = jnp.asarray(rand(3, 5, 4))  # nn.scan: [L, I, O]
  params = {"layers": {"proj": {"kernel": w}}}
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=2.0, target_modules=["proj"], init_lora_weights="pissa")
  res, ad = dora_jax.init_adapters_and_base(
      jax.random.key(0), params, cfg, layouts={"layers/proj": dora_jax.KernelLayout(stack=1)})
  prod = cfg.scale * np.einsum("lir,lro->lio", ad["layers"]["proj"]["lora_a"], ad["layers"]["proj"]["lora_b"])
  for i in range(3):
    np.testing.assert_allclose(prod[i], np_truncated(w[i], 2), atol=1e-5)
  np.testing.assert_allclose(res["layers"]["proj"]["kernel"], np.asarray(w) - prod, atol=1e-6)


# ---------------------------------------------------------------------------
# Against HF PEFT


def _torch_mlp(params):
  torch = pytest.importorskip("torch")

  class TorchMLP(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.up = torch.nn.Linear(4, 6)
      self.down = torch.nn.Linear(6, 5, bias=False)

    def forward(self, x):
      return self.down(torch.tanh(self.up(x)))

  m = TorchMLP()
  with torch.no_grad():
    m.up.weight.copy_(torch.from_numpy(np.asarray(params["up"]["kernel"]).T.copy()))
    m.up.bias.copy_(torch.from_numpy(np.asarray(params["up"]["bias"]).copy()))
    m.down.weight.copy_(torch.from_numpy(np.asarray(params["down"]["kernel"]).T.copy()))
  return m


def _peft_model(torch_mlp, cfg):
  peft = pytest.importorskip("peft")
  pc = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=["up", "down"],
                       init_lora_weights=cfg.init_lora_weights, use_dora=cfg.use_dora,
                       rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern))
  return peft.get_peft_model(copy.deepcopy(torch_mlp), pc)


def _peft_layer(pm, name):
  return getattr(pm.base_model.model, name)


def _spectral_params():
  """Kernels with a wide spectral gap: the randomized SVD (any draw) converges to the exact one."""
  params, x = _params()
  out = {}
  for name, p in params.items():
    u, _, vh = np.linalg.svd(np.asarray(p["kernel"], np.float64), full_matrices=False)
    s = np.array([10.0, 6.0, 0.05, 0.02, 0.01][: len(u.T)])
    out[name] = {**p, "kernel": jnp.asarray((u * s) @ vh, jnp.float32)}
  return out, x


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "orthogonal"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_init_equals_peft(init, use_dora):
  params, x = _spectral_params()
  cfg = _cfg(init, use_dora, rank_pattern={"up": 4}, alpha_pattern={"down": 5.0})
  pm = _peft_model(_torch_mlp(params), cfg)
  res, ad = dora_jax.init_adapters_and_base(jax.random.key(1), params, cfg)
  for name in ("up", "down"):
    layer = _peft_layer(pm, name)
    a_t = layer.lora_A["default"].weight.detach().numpy()
    b_t = layer.lora_B["default"].weight.detach().numpy()
    s_t = layer.scaling["default"]
    assert s_t == pytest.approx(cfg.for_module(name).scale)
    ours = cfg.for_module(name).scale * np.asarray(ad[name]["lora_a"] @ ad[name]["lora_b"])
    np.testing.assert_allclose(ours, s_t * (b_t @ a_t).T, atol=1e-4)  # products: SVD signs vary
    np.testing.assert_allclose(res[name]["kernel"], layer.base_layer.weight.detach().numpy().T,
                               atol=1e-4)
    if use_dora:
      m_t = layer.lora_magnitude_vector["default"].weight.detach().numpy()
      np.testing.assert_allclose(ad[name]["magnitude"], m_t, rtol=1e-5)
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    y_t = pm(torch.from_numpy(np.array(x))).numpy()
  np.testing.assert_allclose(dora_jax.wrap(MLP().apply, cfg)(res, ad, x), y_t, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_export_equals_peft_and_loads_on_original_base(tmp_path, init):
  """PEFT's own conversion (save_pretrained with path_initial_model_for_weight_conversion) of the
  same trained factors writes the tensors and config our export writes; PeftModel loads ours on
  the ORIGINAL base and computes our outputs (LoRA, and DoRA with a trained magnitude)."""
  import torch  # pylint: disable=g-import-not-at-top
  peft = pytest.importorskip("peft")
  params, x = _params()
  cfg = _cfg(init, rank_pattern={"up": 4}, alpha_pattern={"down": 5.0})
  torch_mlp = _torch_mlp(params)
  pm = _peft_model(torch_mlp, cfg)
  pm.peft_config["default"].init_lora_weights = True
  pm.save_pretrained(str(tmp_path / "init"))
  # Our adapters from PEFT's init (its factors and residual), then the same "training" step.
  ad0, res = {}, jax.tree.map(lambda t: t, params)
  for name in ("up", "down"):
    layer = _peft_layer(pm, name)
    ad0[name] = {"lora_a": jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
                 "lora_b": jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T)}
    res[name] = {**res[name], "kernel": jnp.asarray(layer.base_layer.weight.detach().numpy().T)}
  ad = jax.tree.map(lambda t: t + 0.2 * jnp.asarray(rand(*t.shape)), ad0)
  with torch.no_grad():
    for name in ("up", "down"):
      layer = _peft_layer(pm, name)
      layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ad[name]["lora_a"]).T.copy()))
      layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ad[name]["lora_b"]).T.copy()))
  pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
  dora_jax.export_peft(tmp_path / "ours", ad, cfg, params=params, initial_adapters=ad0)
  theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
  assert sorted(theirs) == sorted(ours)
  for k in theirs:
    np.testing.assert_allclose(ours[k], theirs[k], atol=1e-6, err_msg=k)
  c_t, c_o = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
  for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
    assert c_o[field] == c_t[field], field
  want = dora_jax.wrap(MLP().apply, cfg)(res, ad, x)
  loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_mlp), str(tmp_path / "ours")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(loaded(torch.from_numpy(np.array(x))).numpy(), want, atol=1e-5)
  back, cfg_back = dora_jax.import_peft(tmp_path / "ours", params)
  np.testing.assert_allclose(dora_jax.wrap(MLP().apply, cfg_back)(params, back, x), want, atol=1e-5)


def test_converted_dora_export_loads_on_original_base(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  peft = pytest.importorskip("peft")
  params, x = _params()
  cfg = _cfg("pissa", use_dora=True, rank_pattern={"up": 4})
  res, ad0 = dora_jax.init_adapters_and_base(jax.random.key(1), params, cfg)
  ad = jax.tree.map(lambda t: t * (1.0 + 0.3 * jnp.asarray(rand(*t.shape))), ad0)  # incl. magnitude
  dora_jax.export_peft(tmp_path, ad, cfg, params=params, initial_adapters=ad0)
  want = dora_jax.wrap(MLP().apply, cfg)(res, ad, x)
  loaded = peft.PeftModel.from_pretrained(_torch_mlp(params), str(tmp_path)).eval()
  with torch.no_grad():
    np.testing.assert_allclose(loaded(torch.from_numpy(np.array(x))).numpy(), want, atol=1e-5)


def test_unconverted_peft_pissa_adapter_refused_on_import(tmp_path):
  pytest.importorskip("torch")
  params, _ = _params()
  pm = _peft_model(_torch_mlp(params), _cfg("pissa"))
  pm.save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="residual base"):
    dora_jax.import_peft(tmp_path, params)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nnx_apply_adapters_rewrites_base_in_place(init):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dora_jax import nnx as dn  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(4, 6, rngs=rngs)
      self.conv = nnx.Conv(2, 3, (3,), rngs=rngs)

    def __call__(self, x):
      return self.up(x)

  model = Net(nnx.Rngs(0))
  w0 = np.asarray(model.up.kernel[...], np.float64)
  x = jnp.asarray(rand(3, 4))
  base = np.asarray(model(x))
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["up"], use_dora=True,
                            init_lora_weights=init)
  dn.apply_adapters(model, cfg, nnx.Rngs(params=1))
  ad = dn.adapter_dict(model)["up"]
  prod = cfg.scale * np.asarray(ad["lora_a"] @ ad["lora_b"], np.float64)
  want = np_truncated(w0, 2) if init == "pissa" else cfg.scale * np_olora_product(w0, 2)
  np.testing.assert_allclose(prod, want, atol=1e-5)
  np.testing.assert_allclose(model.up.base_layer.kernel[...], w0 - prod, atol=1e-6)
  np.testing.assert_allclose(ad["magnitude"], np.linalg.norm(w0, axis=0), rtol=1e-6)
  np.testing.assert_allclose(model(x), base, atol=1e-5)  # starts equal to the base
  lone = nnx.Linear(4, 6, rngs=nnx.Rngs(0))  # the wrapper on its own rewrites its base too
  wrapped = dn.AdaptedLinear(lone, cfg, rngs=nnx.Rngs(params=1))
  np.testing.assert_allclose(wrapped(x), base, atol=1e-5)
  assert np.abs(np.asarray(lone.kernel[...]) - w0).max() > 1e-2
  with pytest.raises(ValueError, match="Linear-type modules only"):
    dn.apply_adapters(Net(nnx.Rngs(0)), dora_jax.LoraConfig(r=2, target_modules=["conv"],
                                                           init_lora_weights=init), nnx.Rngs(0))
