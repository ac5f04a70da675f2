"""The DoRA execution paths of ``dora_jax.wrap`` (``factored``, ``custom_vjp``, ``merged``).

Every path is checked against an independent numpy PEFT forward, and the
gradients of ``custom_vjp`` and ``merged`` against the autodiff ``factored``
path (adapters and the model input, so the ``(g − 1)·W0`` term of ``∇x`` is
covered), in float32 and bfloat16, for Dense, DenseGeneral and Einsum layers.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import core
from dora_jax import linen as dlinen

RNG = np.random.default_rng(7)
PATHS = ("factored", "custom_vjp", "merged")


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def np_dora_dense(x, w0, bias, a, b, s, m):
  """PEFT's DoRA linear forward (no dropout) in float64, our ``[I, O]`` layout."""
  x, w0, a, b, m = (np.asarray(t, np.float64) for t in (x, w0, a, b, m))
  bias = 0.0 if bias is None else np.asarray(bias, np.float64)
  n = np.sqrt(((w0 + s * a @ b) ** 2).sum(0))
  return (m / n) * (x @ w0 + s * (x @ a) @ b) + bias


class MLP(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="up", dtype=self.dtype, param_dtype=self.dtype)(x)
    return nn.Dense(5, name="down", use_bias=False, dtype=self.dtype, param_dtype=self.dtype)(jnp.tanh(h))


def make(dtype=jnp.float32, dropout=0.0, init=False):
  model = MLP(dtype)
  x = jnp.asarray(rand(3, 7, 4))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: (t + 0.3 * jnp.asarray(rand(*t.shape))).astype(dtype), params)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["up", "down"], use_dora=True,
                            init_lora_weights=init, lora_dropout=dropout)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  if not init:  # move g = m / n away from 1 so the (g − 1) and bias terms count
    ad = jax.tree.map(lambda t: t, ad)
    for k in ad:
      ad[k]["magnitude"] = ad[k]["magnitude"] * jnp.linspace(0.6, 1.4, ad[k]["magnitude"].shape[-1])
  return model, x.astype(dtype), params, cfg, ad


def np_mlp(x, params, ad, cfg):
  up, down = params["up"], params["down"]
  h = np_dora_dense(x, up["kernel"], up["bias"], ad["up"]["lora_a"], ad["up"]["lora_b"], cfg.scale,
                    ad["up"]["magnitude"])
  return np_dora_dense(np.tanh(h), down["kernel"], None, ad["down"]["lora_a"], ad["down"]["lora_b"],
                       cfg.scale, ad["down"]["magnitude"])


def grads_of(f, params, ad, x, dy):
  """Gradients of ``Σ f(params, ad, x) ⊙ dy`` w.r.t. the adapters and the input."""
  loss = lambda ad_, x_: jnp.sum(f(params, ad_, x_).astype(jnp.float32) * dy)
  return jax.grad(loss, argnums=(0, 1))(ad, x)


def assert_trees_close(got, want, rtol, atol):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol,
                               atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_numpy_peft(path):
  model, x, params, cfg, ad = make()
  got = dora_jax.wrap(model.apply, cfg, dora_path=path)(params, ad, x)
  np.testing.assert_allclose(got, np_mlp(np.asarray(x), params, ad, cfg), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", ["custom_vjp", "merged"])
def test_gradients_match_autodiff_path_float32(path):
  model, x, params, cfg, ad = make()
  dy = jnp.asarray(rand(3, 7, 5))
  want = grads_of(dora_jax.wrap(model.apply, cfg, dora_path="factored"), params, ad, x, dy)
  got = grads_of(dora_jax.wrap(model.apply, cfg, dora_path=path), params, ad, x, dy)
  assert_trees_close(got, want, rtol=2e-5, atol=2e-5)


def test_custom_vjp_magnitude_gradient_is_the_papers():
  """∇m = Σ_t dy ⊙ u / n for one biased Dense, from y alone (u = (y − b) / g)."""
  model, x, params, cfg, ad = make()

  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name="up")(x)

  f = dora_jax.wrap(One().apply, cfg, dora_path="custom_vjp")
  p, a = params["up"], {"up": ad["up"]}
  dy = rand(3, 7, 6)
  got = jax.grad(lambda a_: jnp.sum(f({"up": p}, a_, x) * dy))(a)["up"]["magnitude"]
  x64, w0 = np.asarray(x, np.float64).reshape(-1, 4), np.asarray(p["kernel"], np.float64)
  A, B = (np.asarray(ad["up"][k], np.float64) for k in ("lora_a", "lora_b"))
  u = x64 @ w0 + cfg.scale * (x64 @ A) @ B
  n = np.sqrt(((w0 + cfg.scale * A @ B) ** 2).sum(0))
  np.testing.assert_allclose(got, (dy.reshape(-1, 6) * u / n).sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["custom_vjp", "merged"])
def test_gradients_match_autodiff_path_bfloat16(path):
  model, x, params, cfg, ad = make(jnp.bfloat16)
  dy = jnp.asarray(rand(3, 7, 5))
  f_ref = dora_jax.wrap(model.apply, cfg, dora_path="factored")  # autodiff reference
  f = dora_jax.wrap(model.apply, cfg, dora_path=path)
  np.testing.assert_allclose(np.asarray(f(params, ad, x), np.float32),
                             np.asarray(f_ref(params, ad, x), np.float32), rtol=3e-2, atol=3e-2)
  want = grads_of(f_ref, params, ad, x, dy)
  got = grads_of(f, params, ad, x, dy)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    # bf16 rounding differs between the paths: compare relative to each tensor's scale.
    assert np.max(np.abs(g - w)) <= 4e-2 * np.max(np.abs(w)) + 1e-3, (np.max(np.abs(g - w)), np.max(np.abs(w)))


def test_init_equals_base_on_every_path():
  model, x, params, cfg, ad = make(init=True)
  base = model.apply({"params": params}, x)
  for path in PATHS:
    np.testing.assert_allclose(dora_jax.wrap(model.apply, cfg, dora_path=path)(params, ad, x), base,
                               atol=2e-6, err_msg=path)


@pytest.mark.parametrize("path", ["custom_vjp", "merged"])
def test_dropout_runs_the_factored_form(path):
  model, x, params, cfg, ad = make(dropout=0.3)
  rngs = {"dropout": jax.random.key(3)}
  want = dora_jax.wrap(model.apply, cfg, dora_path="factored")(params, ad, x, rngs=rngs)
  got = dora_jax.wrap(model.apply, cfg, dora_path=path)(params, ad, x, rngs=rngs)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


class General(nn.Module):
  """DenseGeneral over two input axes into two output axes, and a permuted-output Einsum with bias."""

  @nn.compact
  def __call__(self, x):  # x [B, T, 2, 3]
    h = nn.DenseGeneral((4, 2), axis=(-2, -1), name="dg")(x)  # [B, T, 4, 2]
    return nn.Einsum((4, 2, 5), "btij,ijk->bkt", use_bias=True, name="ein")(h)  # [B, 5, T]


@pytest.mark.parametrize("path", ["custom_vjp", "merged"])
def test_dense_general_and_einsum_match_autodiff_path(path):
  model = General()
  x = jnp.asarray(rand(2, 3, 2, 3))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: t + 0.3 * jnp.asarray(rand(*t.shape)), params)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=2.0, target_modules=["dg", "ein"], use_dora=True,
                            init_lora_weights=False)
  layouts = dora_jax.kernel_layouts(model, x)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=layouts)
  for k in ad:
    ad[k]["magnitude"] = ad[k]["magnitude"] * jnp.linspace(0.5, 1.5, ad[k]["magnitude"].shape[-1])
  dy = jnp.asarray(rand(2, 5, 3))
  f_ref = dora_jax.wrap(model.apply, cfg, dora_path="factored")  # autodiff reference
  f = dora_jax.wrap(model.apply, cfg, dora_path=path)
  np.testing.assert_allclose(f(params, ad, x), f_ref(params, ad, x), rtol=2e-5, atol=2e-5)
  assert_trees_close(grads_of(f, params, ad, x, dy), grads_of(f_ref, params, ad, x, dy), 5e-5, 5e-5)


def test_lowp_norm_keeps_the_kernel_dtype_and_matches_float32():
  w = jnp.asarray(rand(33, 9)).astype(jnp.bfloat16)
  got = core.column_norm_sq(w)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, (np.asarray(w, np.float64) ** 2).sum(0), rtol=1e-6)
  jaxpr = str(jax.make_jaxpr(core.column_norm_sq)(w))
  assert "convert_element_type" not in jaxpr  # no float32 copy of the kernel


def test_unknown_path_is_rejected():
  model, _, _, cfg, _ = make()
  with pytest.raises(ValueError, match="dora_path"):
    dora_jax.wrap(model.apply, cfg, dora_path="fused")


def test_custom_vjp_runs_under_scan_and_remat():
  from dora_jax.models.llama import Llama, LlamaConfig

  c = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
  model = Llama(c, scan_layers=True, remat="full")
  ids = jnp.asarray(RNG.integers(0, 64, (2, 5)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
  cfg = dora_jax.LoraConfig(r=2, target_modules="all-linear", use_dora=True, init_lora_weights=False)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=dora_jax.kernel_layouts(model, ids))

  def loss(path):
    f = dora_jax.wrap(model.apply, cfg, dora_path=path)
    return lambda a: jnp.mean(jax.nn.log_softmax(f(params, a, ids))[..., 0])

  want = jax.grad(loss("factored"))(ad)
  for path in ("custom_vjp", "merged"):
    assert_trees_close(jax.jit(jax.grad(loss(path)))(ad), want, 1e-4, 1e-6)


def test_merged_path_does_not_warn(caplog):
  dlinen._said_merged.clear()
  model, x, params, cfg, ad = make()
  with caplog.at_level("WARNING", logger="dora_jax"):
    dora_jax.wrap(model.apply, cfg, dora_path="merged")(params, ad, x)
  assert not caplog.records


def test_custom_vjp_path_is_taken_only_without_dropout():
  model, x, params, cfg, ad = make(dropout=0.2)
  f = dora_jax.wrap(model.apply, cfg, dora_path="custom_vjp")
  plain = str(jax.make_jaxpr(lambda a: f(params, a, x))(ad))
  dropped = str(jax.make_jaxpr(lambda a: f(params, a, x, rngs={"dropout": jax.random.key(0)}))(ad))
  lean = "name=_lean"  # the lean DoRA custom_vjp (the LoRA down-projection has its own)
  assert plain.count(lean) == 2 and lean not in dropped


@pytest.mark.parametrize("path", ["factored", "custom_vjp"])
def test_cached_base_norms_give_the_same_outputs_and_gradients(path):
  model, x, params, cfg, ad = make()
  norms = dlinen.base_norms(params, ad)
  assert set(norms) == {"up", "down"} and norms["up"]["w0_norm_sq"].shape == (6,)
  f = dora_jax.wrap(model.apply, cfg, dora_path=path)
  dy = jnp.asarray(rand(3, 7, 5))
  np.testing.assert_allclose(f(params, ad, x, base_norms=norms), f(params, ad, x), rtol=1e-6, atol=1e-6)
  loss = lambda a, n: jnp.sum(f(params, a, x, base_norms=n) * dy)
  assert_trees_close(jax.grad(loss)(ad, norms), jax.grad(loss)(ad, None), 1e-5, 1e-6)


def test_cached_base_norms_make_g_exactly_one_at_init_under_scan():
  from dora_jax.models.llama import Llama, LlamaConfig

  c = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
  model = Llama(c, scan_layers=True)
  ids = jnp.asarray(RNG.integers(0, 64, (2, 5)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
  cfg = dora_jax.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], use_dora=True)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=dora_jax.kernel_layouts(model, ids))
  norms = dlinen.base_norms(params, ad)
  assert norms["model"]["layers"]["mlp"]["down_proj"]["w0_norm_sq"].shape == (2, 16)
  base = model.apply({"params": params}, ids)
  for path in ("factored", "custom_vjp"):
    got = dora_jax.wrap(model.apply, cfg, dora_path=path)(params, ad, ids, base_norms=norms)
    np.testing.assert_array_equal(got, base)


def test_base_norms_for_a_module_without_dora_are_rejected():
  model, x, params, cfg, ad = make()
  norms = dlinen.base_norms(params, ad)
  lora_ad = {k: {n: v[n] for n in ("lora_a", "lora_b")} for k, v in ad.items()}
  f = dora_jax.wrap(model.apply, dataclasses.replace(cfg, use_dora=False))
  with pytest.raises(ValueError, match="no DoRA adapter"):
    f(params, lora_ad, x, base_norms=norms)


# ---------------------------------------------------------------------------
# LoRA (no magnitude): the default path's written-out backward


class _OneDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name="up")(x)


def _one_dense(x_shape):
  """A one-Dense (6 outputs, named "up") model, an input of ``x_shape`` and perturbed params."""
  model, x = _OneDense(), jnp.asarray(rand(*x_shape))
  params = jax.tree.map(lambda t: t + 0.3 * jnp.asarray(rand(*t.shape)),
                        model.init(jax.random.key(0), x)["params"])
  return model, x, params


def test_lora_default_backward_matches_numpy():
  """y = x W0 + b + s·(x A) B: ∇A = s·xᵀ(∇y Bᵀ), ∇B = s·(x A)ᵀ∇y, ∇x = ∇y W0ᵀ + s·∇y Bᵀ Aᵀ."""

  model, x, params = _one_dense((3, 7, 4))
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["up"], init_lora_weights=False)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  dy = rand(3, 7, 6)
  f = dora_jax.wrap(model.apply, cfg)  # the default path
  d_ad, dx = grads_of(f, params, ad, x, jnp.asarray(dy))
  s = cfg.scale
  x64, dy64 = np.asarray(x, np.float64).reshape(-1, 4), dy.reshape(-1, 6).astype(np.float64)
  w0 = np.asarray(params["up"]["kernel"], np.float64)
  a, b = (np.asarray(ad["up"][k], np.float64) for k in ("lora_a", "lora_b"))
  np.testing.assert_allclose(f(params, ad, x).reshape(-1, 6),
                             x64 @ w0 + params["up"]["bias"] + s * (x64 @ a) @ b, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(d_ad["up"]["lora_a"], s * x64.T @ (dy64 @ b.T), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(d_ad["up"]["lora_b"], s * (x64 @ a).T @ dy64, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(dx).reshape(-1, 4), dy64 @ w0.T + s * dy64 @ b.T @ a.T,
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_default_backward_matches_autodiff_dense_general_einsum(dtype):
  model = General()
  x = jnp.asarray(rand(2, 3, 2, 3)).astype(dtype)
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: (t + 0.3 * jnp.asarray(rand(*t.shape))).astype(dtype), params)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=2.0, target_modules=["dg", "ein"], init_lora_weights=False,
                            adapter_dtype=dtype)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=dora_jax.kernel_layouts(model, x))
  dy = jnp.asarray(rand(2, 5, 3))
  f_ref = dora_jax.wrap(model.apply, cfg, dora_path="factored")  # autodiff reference
  f = dora_jax.wrap(model.apply, cfg)
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(f(params, ad, x), np.float32),
                             np.asarray(f_ref(params, ad, x), np.float32), rtol=tol, atol=tol)
  got, want = grads_of(f, params, ad, x, dy), grads_of(f_ref, params, ad, x, dy)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.max(np.abs(g - w)) <= (5e-5 if dtype == jnp.float32 else 4e-2) * np.max(np.abs(w)) + 1e-5


# ---------------------------------------------------------------------------
# DoRA: the default path's written-out backward against float64 formulas


@pytest.mark.parametrize("tokens", [(4, 8), (1, 3)])
def test_dora_default_backward_matches_numpy(tokens):
  """y = g ⊙ (x W0 + s·(x A) B) + b, g = m / sg(n): ∇m = Σ_t ∇y ⊙ u / n,
  ∇B = s·(x A)ᵀ(g ⊙ ∇y), ∇A = s·xᵀ((g ⊙ ∇y) Bᵀ), ∇x = (g ⊙ ∇y)(W0ᵀ + s·Bᵀ Aᵀ). 32 token
  rows (≥ I = 5: g folded into the [I, O] matrices; the folded column sum of ∇m runs) and
  3 rows (< I: g on the [tokens, O] cotangent)."""

  model, x, params = _one_dense((*tokens, 5))
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["up"], use_dora=True,
                            init_lora_weights=False)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  ad["up"]["magnitude"] = ad["up"]["magnitude"] * jnp.linspace(0.3, 1.7, 6)
  dy = rand(*tokens, 6)
  f = dora_jax.wrap(model.apply, cfg)  # the default path
  d_ad, dx = grads_of(f, params, ad, x, jnp.asarray(dy))
  s = cfg.scale
  x64, dy64 = np.asarray(x, np.float64).reshape(-1, 5), dy.reshape(-1, 6).astype(np.float64)
  w0, bias = (np.asarray(params["up"][k], np.float64) for k in ("kernel", "bias"))
  a, b, m = (np.asarray(ad["up"][k], np.float64) for k in ("lora_a", "lora_b", "magnitude"))
  n = np.sqrt(((w0 + s * a @ b) ** 2).sum(0))
  g, u = m / n, x64 @ w0 + s * (x64 @ a) @ b
  dyg = dy64 * g
  np.testing.assert_allclose(np.asarray(f(params, ad, x)).reshape(-1, 6), g * u + bias, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(d_ad["up"]["magnitude"], (dy64 * u).sum(0) / n, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(d_ad["up"]["lora_b"], s * (x64 @ a).T @ dyg, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(d_ad["up"]["lora_a"], s * x64.T @ (dyg @ b.T), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(dx).reshape(-1, 5), dyg @ (w0.T + s * b.T @ a.T),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("x_shape", [(4, 8), (3, 7), (2, 6)])
def test_per_output_sum_matches_numpy(x_shape):
  """Folded (row counts divisible by 8 or 2) and plain (21 rows) column sums of a Dense layout,
  and an Einsum layout whose output axis is not last."""
  from dora_jax.projection import Projection

  dense = Projection.dense(3, (-1,), (4,), (5,))
  t = rand(*x_shape, 5)
  np.testing.assert_allclose(dense.per_output_sum(jnp.asarray(t)), t.reshape(-1, 5).sum(0),
                             rtol=1e-5, atol=1e-5)
  ein = Projection.einsum("bti,io->bot", (*x_shape, 4), (4, 5))
  t = rand(x_shape[0], 5, x_shape[1])
  np.testing.assert_allclose(ein.per_output_sum(jnp.asarray(t)), t.sum((0, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "dense_two_in_axes", "einsum_out_not_last"])
def test_down_projection_gradients_match_numpy(kind, dtype):
  """``h = x A`` through :meth:`Projection.down` (written backward: ∇A = (∇hᵀ x)ᵀ) against
  float64 ``∇A = xᵀ ∇h``, ``∇x = ∇h Aᵀ``, with the kernel's input axes flattened in order."""
  from dora_jax.projection import Projection

  if kind == "dense":
    proj, x_shape = Projection.dense(3, (-1,), (4,), (5,)), (2, 3, 4)
  elif kind == "dense_two_in_axes":
    proj, x_shape = Projection.dense(4, (1, 3), (3, 2), (5,)), (2, 3, 4, 2)
  else:
    proj, x_shape = Projection.einsum("bit,io->bot", (2, 4, 3), (4, 5)), (2, 4, 3)
  r = 3
  x64, a64 = rand(*x_shape).astype(np.float64), rand(proj.i_dim, r).astype(np.float64)
  h, vjp = jax.vjp(lambda x, a: proj.down(x, a, dtype).astype(jnp.float32),
                   jnp.asarray(x64, dtype), jnp.asarray(a64, dtype))
  free_shape = h.shape[:-1]
  dh64 = rand(*free_shape, r).astype(np.float64)
  dx, da = vjp(jnp.asarray(dh64, jnp.float32))
  assert dx.dtype == dtype and da.dtype == dtype and da.shape == (proj.i_dim, r)
  # x as [tokens, I]: the free axes first, then the kernel's input axes in kernel order.
  order = [proj.lhs.index(c) for c in proj.free] + [proj.lhs.index(c) for c in proj.ins]
  x_mat = np.transpose(x64, order).reshape(-1, proj.i_dim)
  tol = 2e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(h, np.float64).reshape(-1, r), x_mat @ a64, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(da, np.float64), x_mat.T @ dh64.reshape(-1, r), rtol=tol, atol=tol)
  dx_mat = dh64.reshape(-1, r) @ a64.T
  inverse = np.argsort(order)
  want_dx = np.transpose(dx_mat.reshape([x64.shape[i] for i in order]), inverse)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol)


def test_custom_vjp_gradients_of_the_base_params_match_autodiff_path():
  """Differentiating the (usually frozen) kernels and biases too: the lean backward then keeps
  the y0 cotangent g ⊙ ∇y for the module's own backward, and every gradient matches."""
  model, x, params, cfg, ad = make()
  dy = jnp.asarray(rand(3, 7, 5))

  def grads(path):
    f = dora_jax.wrap(model.apply, cfg, dora_path=path)
    loss = lambda p_, ad_, x_: jnp.sum(f(p_, ad_, x_) * dy)
    return jax.grad(loss, argnums=(0, 1, 2))(params, ad, x)

  assert_trees_close(grads("custom_vjp"), grads("factored"), rtol=2e-5, atol=2e-5)
