"""Every layer type × every feature (issue 11's matrix), tiny shapes.

Layer types: Linen Dense, DenseGeneral (two input axes), Einsum, Conv 1-D / 2-D, grouped Conv,
Embed (untied, and tied: the same table as the head through ``attend``); NNX Linear, Conv, Embed.
Features, each against an independent reference written here (the base Flax module run on a
numpy-merged ``W' = m ⊙ V / ||V||_c``, ``V = W0 + s·A B``, or that formula in jnp with the
norm detached, as PEFT's DoRA):

=================  =======  =======  =====  ============  =====  ==========================
layer              forward  dropout  grads  merge/unmrg   Orbax  PEFT export / import
=================  =======  =======  =====  ============  =====  ==========================
Dense / Linear     here     here     here   here          here   here; torch: test_peft_format,
                                                                 test_inits (PiSSA/OLoRA)
DenseGeneral       here     here     here   here          here   here (round trip); torch below
Einsum             here     here     here   here          here   here (round trip); torch below
Conv 1-D / 2-D     here     here     here   here          here   here; torch: test_peft_layers::
                                                                 test_conv_export_loads_in_peft...
grouped Conv       here     logged   here   here          here   refused here (LoRA and DoRA);
                   (merged W')                                   PEFT's own: test_peft_layers::
                                                                 test_grouped_conv_refused
Embed untied       here     none¹    here   here          here   here; torch: test_peft_layers::
                                                                 test_embedding_export_loads...
Embed tied         here     none¹    here   here          here   LoRA here; torch + DoRA refusal:
                                                                 test_peft_layers::test_tied_...
NNX Linear/Conv/   here     here²    here   here          here   here (round trip via param_dict)
Embed
=================  =======  =======  =====  ============  =====  ==========================

¹ PEFT applies no dropout to embedding ids; ``attend`` runs on the merged table (logged).
² Dropout forms with a fixed mask: test_core::test_dropout_form_matches_peft,
  test_conv_embed::test_linen_conv_matches_lax_reference_with_fixed_mask,
  test_nnx_layers::test_nnx_conv_matches_lax_reference_and_linen; mode following the host:
  test_nnx_layers::test_adapter_dropout_follows_model_mode.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import nnx as dn

RNG = np.random.default_rng(5)
RATE = 0.5


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


class One(nn.Module):
  """One adapted layer named ``layer``; ``tied``: an Embed that is also the head (``attend``)."""
  make: functools.partial
  tied: bool = False

  @nn.compact
  def __call__(self, x):
    layer = self.make(name="layer")
    y = layer(x)
    return layer.attend(jnp.tanh(y)) if self.tied else y


IDS = np.asarray(RNG.integers(0, 10, (3, 4)), np.int32)
LINEN = {
    "dense": (functools.partial(nn.Dense, 5), (3, 4), False),
    "dense_general": (functools.partial(nn.DenseGeneral, (2, 3), axis=(-2, -1)), (3, 2, 4), False),
    "einsum": (functools.partial(nn.Einsum, (4, 2, 3), "bi,iho->bho", use_bias=False), (3, 4), False),
    "conv1d": (functools.partial(nn.Conv, 5, (3,)), (2, 7, 3), False),
    "conv2d": (functools.partial(nn.Conv, 5, (3, 2)), (2, 6, 5, 3), False),
    "grouped_conv": (functools.partial(nn.Conv, 6, (3, 3), feature_group_count=2), (2, 5, 5, 4), False),
    "embed": (functools.partial(nn.Embed, 10, 6), None, False),
    "embed_tied": (functools.partial(nn.Embed, 10, 6), None, True),
}
DROPOUT_APPLIES = {"dense", "dense_general", "einsum", "conv1d", "conv2d"}
CASES = [(name, d) for name in LINEN for d in (False, True)]


def _cfg(use_dora, **kw):
  return dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["layer"], use_dora=use_dora,
                             init_lora_weights=False, lora_dropout=RATE, **kw)


@functools.lru_cache(maxsize=None)
def linen_case(name, use_dora):
  make, x_shape, tied = LINEN[name]
  model = One(make, tied)
  x = jnp.asarray(IDS) if x_shape is None else jnp.asarray(rand(*x_shape))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: t + 0.1 * jnp.asarray(rand(*t.shape)), params)  # nonzero bias
  layouts = dora_jax.kernel_layouts(model, x)
  cfg = _cfg(use_dora)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=layouts)
  if use_dora:  # off the init, so g = m / ||V|| != 1
    ad = {"layer": {**ad["layer"], "magnitude": ad["layer"]["magnitude"] * jnp.linspace(0.7, 1.3, ad["layer"]["magnitude"].shape[-1])}}
  return model, x, params, layouts, cfg, ad


def weight_key(params):
  return "embedding" if "embedding" in params["layer"] else "kernel"


def merged_weight(w0, a, b, s, m, xp=np, detach=lambda t: t):
  """``W'`` of a kernel ``[*in, *out]`` whose matrix view is ``[I, O] = [prod(in), O]`` with
  ``O = a.shape``-implied outputs (``b: [r, O]``)."""
  o = b.shape[-1]
  i = math.prod(w0.shape) // o
  v = xp.reshape(w0, (i, o)) + s * (a @ b)
  if m is not None:
    v = v * (m / detach(xp.sqrt(xp.sum(v * v, axis=0))))
  return xp.reshape(v, w0.shape)


def np_reference(model, params, ad, cfg, x):
  """The base Flax module (no dora_jax) run on the numpy-merged weight."""
  key = weight_key(params)
  a = {k: np.asarray(v, np.float64) for k, v in ad["layer"].items()}
  w = merged_weight(np.asarray(params["layer"][key], np.float64), a["lora_a"], a["lora_b"],
                    cfg.scale, a.get("magnitude"))
  merged = {**params, "layer": {**params["layer"], key: jnp.asarray(w, jnp.float32)}}
  return np.asarray(model.apply({"params": merged}, x)), w


# ---------------------------------------------------------------------------
# Linen


@pytest.mark.parametrize("name,use_dora", CASES)
def test_linen_forward_dropout_and_merge(name, use_dora):
  model, x, params, layouts, cfg, ad = linen_case(name, use_dora)
  f = dora_jax.wrap(model.apply, cfg)
  want, w_np = np_reference(model, params, ad, cfg, x)
  y_eval = np.asarray(f(params, ad, x))  # no dropout rng: eval mode
  np.testing.assert_allclose(y_eval, want, atol=2e-5, rtol=2e-5)
  y1 = np.asarray(f(params, ad, x, rngs={"dropout": jax.random.key(1)}))
  y2 = np.asarray(f(params, ad, x, rngs={"dropout": jax.random.key(2)}))
  if name in DROPOUT_APPLIES:
    assert np.abs(y1 - y2).max() > 1e-3 and np.abs(y1 - y_eval).max() > 1e-3
    np.testing.assert_allclose(f(params, ad, x, rngs={"dropout": jax.random.key(1)}, adapter_dropout=False),
                               want, atol=2e-5, rtol=2e-5)
  else:  # PEFT applies none to embedding ids; the merged fallback cannot (and says so)
    np.testing.assert_allclose(y1, y_eval, atol=1e-6)
  merged, norms = dora_jax.merge(params, ad, cfg, return_norms=True)
  key = weight_key(params)
  np.testing.assert_allclose(merged["layer"][key], w_np, atol=2e-5, rtol=2e-5)
  back = dora_jax.unmerge(merged, ad, cfg, norms)
  np.testing.assert_allclose(back["layer"][key], params["layer"][key], atol=2e-5)


@pytest.mark.parametrize("name,use_dora", CASES)
def test_linen_gradients_equal_jnp_formula(name, use_dora):
  model, x, params, layouts, cfg, ad = linen_case(name, use_dora)
  key = weight_key(params)
  ct = jnp.asarray(rand(*np.shape(model.apply({"params": params}, x))))

  def ours(adapters):
    return jnp.sum(dora_jax.wrap(model.apply, cfg)(params, adapters, x) * ct)

  def ref(adapters):
    a = adapters["layer"]
    w = merged_weight(params["layer"][key], a["lora_a"], a["lora_b"], cfg.scale, a.get("magnitude"),
                      xp=jnp, detach=jax.lax.stop_gradient)
    return jnp.sum(model.apply({"params": {**params, "layer": {**params["layer"], key: w}}}, x) * ct)

  g, g_ref = jax.grad(ours)(ad), jax.grad(ref)(ad)
  for leaf in g["layer"]:
    assert np.isfinite(np.asarray(g["layer"][leaf])).all()
    np.testing.assert_allclose(g["layer"][leaf], g_ref["layer"][leaf], atol=1e-4, rtol=1e-4, err_msg=leaf)


@pytest.mark.parametrize("use_dora", [False, True])
def test_linen_orbax_roundtrip_every_layer(tmp_path, use_dora):
  """One checkpoint holding every layer type's adapter: bitwise equal after load."""
  combined = {name: linen_case(name, use_dora)[5]["layer"] for name in LINEN}
  cfg = _cfg(use_dora)
  dora_jax.save_adapters(tmp_path / "ckpt", combined, cfg)
  loaded, cfg2 = dora_jax.load_adapters(tmp_path / "ckpt", cfg)
  assert cfg2 == cfg
  for name in LINEN:
    for leaf, v in combined[name].items():
      np.testing.assert_array_equal(loaded[name][leaf], v, err_msg=f"{name}/{leaf}")


@pytest.mark.parametrize("name,use_dora", CASES)
def test_linen_peft_export_import_roundtrip(tmp_path, name, use_dora):
  model, x, params, layouts, cfg, ad = linen_case(name, use_dora)
  if name == "grouped_conv":
    with pytest.raises(ValueError, match="grouped conv"):
      dora_jax.export_peft(tmp_path, ad, cfg, params=params, layouts=layouts)
    return
  if name == "embed_tied" and use_dora:  # DoRA on a tied head has no PEFT equivalent
    with pytest.raises(ValueError, match="LM head"):
      dora_jax.export_peft(tmp_path, ad, cfg, params=params, layouts=layouts)
    return
  dora_jax.export_peft(tmp_path, ad, cfg, params=params, layouts=layouts,
                       tied_embeddings=name == "embed_tied")
  back, cfg2 = dora_jax.import_peft(tmp_path, params, layouts=layouts)
  assert cfg2 == cfg
  for leaf, v in ad["layer"].items():
    np.testing.assert_allclose(back["layer"][leaf], v, atol=0, err_msg=leaf)


@pytest.mark.parametrize("name", ["dense_general_1in", "einsum"])
def test_multi_output_kernels_load_in_peft_as_linear(tmp_path, name):
  """DenseGeneral / Einsum kernels ``[I, *out]`` are a torch Linear ``[prod(out), I]``: PEFT
  loads our export on that Linear and computes our outputs (flattened)."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  if name == "einsum":
    model, x, params, layouts, cfg, ad = linen_case("einsum", True)
  else:
    make = functools.partial(nn.DenseGeneral, (2, 3))
    model, x = One(make), jnp.asarray(rand(3, 4))
    params = jax.tree.map(lambda t: t + 0.1 * jnp.asarray(rand(*t.shape)),
                          model.init(jax.random.key(0), x)["params"])
    layouts, cfg = dora_jax.kernel_layouts(model, x), _cfg(True)
    ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=layouts)
  want = np.asarray(dora_jax.wrap(model.apply, cfg)(params, ad, x)).reshape(x.shape[0], -1)
  dora_jax.export_peft(tmp_path, ad, cfg, params=params, layouts=layouts)
  tm = torch.nn.Sequential()
  tm.layer = torch.nn.Linear(4, 6, bias="bias" in params["layer"])
  with torch.no_grad():
    tm.layer.weight.copy_(torch.from_numpy(np.asarray(params["layer"]["kernel"]).reshape(4, 6).T.copy()))
    if "bias" in params["layer"]:
      tm.layer.bias.copy_(torch.from_numpy(np.asarray(params["layer"]["bias"]).reshape(6).copy()))
  pm = peft.PeftModel.from_pretrained(tm, str(tmp_path)).eval()
  with torch.no_grad():
    got = pm(torch.from_numpy(np.asarray(x).copy())).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------
# NNX


class NnxOne(nnx.Module):
  def __init__(self, kind, rngs):
    if kind == "linear":
      self.layer = nnx.Linear(4, 5, rngs=rngs)
    elif kind == "conv":
      self.layer = nnx.Conv(3, 5, (3, 2), rngs=rngs)
    else:
      self.layer = nnx.Embed(10, 6, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)  # a mode-carrying module: train() / eval() reach it

  def __call__(self, x):
    return self.layer(x)


NNX_X = {"linear": (3, 4), "conv": (2, 6, 5, 3), "embed": None}


def nnx_case(kind, use_dora):
  model = NnxOne(kind, nnx.Rngs(0))
  x = jnp.asarray(IDS) if NNX_X[kind] is None else jnp.asarray(rand(*NNX_X[kind]))
  if kind != "embed":
    model.layer.bias[...] = jnp.asarray(rand(*model.layer.bias.shape))
  params = dn.param_dict(model)
  dn.apply_adapters(model, _cfg(use_dora), nnx.Rngs(params=1, dropout=2))
  if use_dora:
    model.layer.magnitude[...] = model.layer.magnitude[...] * jnp.linspace(0.7, 1.3, model.layer.magnitude.shape[-1])
  return model, x, params


def nnx_reference(kind, params, ad, cfg, x):
  """A fresh NNX module of the same type holding the numpy-merged weight."""
  key = "embedding" if kind == "embed" else "kernel"
  a = {k: np.asarray(v, np.float64) for k, v in ad["layer"].items()}
  w = merged_weight(np.asarray(params["layer"][key], np.float64), a["lora_a"], a["lora_b"],
                    cfg.scale, a.get("magnitude"))
  ref = NnxOne(kind, nnx.Rngs(0))
  getattr(ref.layer, key)[...] = jnp.asarray(w, jnp.float32)
  if kind != "embed":
    ref.layer.bias[...] = params["layer"]["bias"]
  return np.asarray(ref(x)), w


@pytest.mark.parametrize("kind", ["linear", "conv", "embed"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_nnx_every_feature(tmp_path, kind, use_dora):
  model, x, params = nnx_case(kind, use_dora)
  cfg = _cfg(use_dora)
  ad = dn.adapter_dict(model)
  want, w_np = nnx_reference(kind, params, ad, cfg, x)
  model.eval()
  np.testing.assert_allclose(model(x), want, atol=2e-5, rtol=2e-5)
  model.train()
  y1, y2 = np.asarray(model(x)), np.asarray(model(x))  # the dropout rng advances
  if kind == "embed":  # PEFT applies no dropout to embedding ids
    np.testing.assert_allclose(y1, want, atol=2e-5, rtol=2e-5)
  else:
    assert np.abs(y1 - y2).max() > 1e-3 and np.abs(y1 - want).max() > 1e-3
  model.eval()
  # Gradients w.r.t. the adapters equal those of the jnp formula (norm detached).
  key = "embedding" if kind == "embed" else "kernel"
  ct = jnp.asarray(rand(*want.shape))
  g = nnx.grad(lambda m: jnp.sum(m(x) * ct), argnums=nnx.DiffState(0, dn.Adapter))(model)
  g = {k: v.get_value() if hasattr(v, "get_value") else v for k, v in g["layer"].items()}

  def ref(leaves):
    w = merged_weight(params["layer"][key], leaves["lora_a"], leaves["lora_b"], cfg.scale,
                      leaves.get("magnitude"), xp=jnp, detach=jax.lax.stop_gradient)
    r = NnxOne(kind, nnx.Rngs(0))
    getattr(r.layer, key)[...] = w
    if kind != "embed":
      r.layer.bias[...] = params["layer"]["bias"]
    return jnp.sum(r(x) * ct)

  g_ref = jax.grad(ref)(dict(ad["layer"]))
  for leaf in ad["layer"]:
    assert np.isfinite(np.asarray(g[leaf])).all()
    np.testing.assert_allclose(g[leaf], g_ref[leaf], atol=1e-4, rtol=1e-4, err_msg=leaf)
  # Merge (functional, and in place) equals the numpy W'; unmerge gives W0 back.
  merged, norms = dora_jax.merge(params, ad, cfg, return_norms=True)
  np.testing.assert_allclose(merged["layer"][key], w_np, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(dora_jax.unmerge(merged, ad, cfg, norms)["layer"][key],
                             params["layer"][key], atol=2e-5)
  # Orbax and PEFT round trips of the adapter dict.
  dora_jax.save_adapters(tmp_path / "ckpt", ad, cfg)
  loaded, _ = dora_jax.load_adapters(tmp_path / "ckpt", cfg)
  layouts = dn.kernel_layouts(model)
  dora_jax.export_peft(tmp_path / "peft", ad, cfg, params=params, layouts=layouts,
                       tied_embeddings=False)
  back, _ = dora_jax.import_peft(tmp_path / "peft", params, layouts=layouts)
  for leaf, v in ad["layer"].items():
    np.testing.assert_array_equal(loaded["layer"][leaf], v)
    np.testing.assert_array_equal(back["layer"][leaf], v)
  merged_model = dn.merge_adapters(model)
  np.testing.assert_allclose(merged_model(x), want, atol=2e-5, rtol=2e-5)
