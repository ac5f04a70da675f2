"""The core math and the Linen path against independent numpy references."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax
from dora_jax import core, linen as dlinen

RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
  return (RNG.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------
# Independent numpy reference of PEFT's LoRA / DoRA linear forward.
# Our layout: W0 [I, O], A [I, r], B [r, O]; PEFT's torch layout is the transpose.


def np_peft_linear(x, w0, bias, a, b, s, m=None, drop_mask=None, rate=0.0):
  """PEFT's LoraLayer/DoraLinearLayer forward (training mode) in numpy float64."""
  x, w0, a, b = (np.asarray(t, np.float64) for t in (x, w0, a, b))
  result = x @ w0 + (0.0 if bias is None else bias)
  xd = x if drop_mask is None else x * drop_mask / (1.0 - rate)
  lora = xd @ a @ b
  if m is None:
    return result + s * lora
  weight = w0 + s * a @ b
  norm = np.sqrt((weight ** 2).sum(axis=0))  # one per output feature
  g = np.asarray(m, np.float64) / norm
  base = result - (0.0 if bias is None else bias) if drop_mask is None else xd @ w0
  return result + (g - 1) * base + g * lora * s


class MLP(nn.Module):
  hidden: int = 6
  out: int = 5

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, name="up")(x)
    return nn.Dense(self.out, name="down", use_bias=False)(jnp.tanh(h))


def make_mlp(use_dora=True, r=2, init=False, dropout=0.0, rslora=False, seed=0):
  model = MLP()
  x = jnp.asarray(rand(7, 4))
  params = model.init(jax.random.key(seed), x)["params"]
  params = jax.tree.map(lambda t: t + 0.1 * jnp.asarray(rand(*t.shape)), params)  # nonzero bias
  cfg = dora_jax.LoraConfig(r=r, lora_alpha=3.0, target_modules=["up", "down"], use_dora=use_dora,
                            init_lora_weights=init, lora_dropout=dropout, use_rslora=rslora)
  ad = dora_jax.init_adapters(jax.random.key(seed + 1), params, cfg)
  if use_dora and init is False:  # g = m/n != 1, so the (g - 1) and bias terms are exercised
    ad = {k: {**v, "magnitude": v["magnitude"] * jnp.linspace(0.7, 1.3, v["magnitude"].shape[-1])}
          for k, v in ad.items()}
  return model, x, params, cfg, ad


def np_mlp(x, params, ad, cfg, masks=None, rate=0.0):
  s = cfg.scale
  up, down = params["up"], params["down"]
  aup, adn = ad["up"], ad["down"]
  h = np_peft_linear(x, up["kernel"], np.asarray(up["bias"]), aup["lora_a"], aup["lora_b"], s,
                     aup.get("magnitude"), None if masks is None else masks[0], rate)
  return np_peft_linear(np.tanh(h), down["kernel"], None, adn["lora_a"], adn["lora_b"], s,
                        adn.get("magnitude"), None if masks is None else masks[1], rate)


@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_wrap_and_merge_match_numpy_peft(use_dora, rslora):
  model, x, params, cfg, ad = make_mlp(use_dora=use_dora, init=False, rslora=rslora)
  expected = np_mlp(np.asarray(x), params, ad, cfg)
  got = dora_jax.wrap(model.apply, cfg)(params, ad, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  merged = dora_jax.merge(params, ad, cfg)
  np.testing.assert_allclose(model.apply({"params": merged}, x), expected, rtol=1e-5, atol=1e-5)
  assert cfg.scale == pytest.approx(3.0 / (math.sqrt(2) if rslora else 2))


def test_dropout_form_matches_peft(monkeypatch):
  rate = 0.4
  model, x, params, cfg, ad = make_mlp(use_dora=True, init=False, dropout=rate)
  masks = [(RNG.random((7, 4)) > rate).astype(np.float32), (RNG.random((7, 6)) > rate).astype(np.float32)]
  calls = []

  def fixed_dropout(v, rate_, rng):
    mask = masks[len(calls)]
    calls.append(rate_)
    return v * mask / (1.0 - rate_)

  monkeypatch.setattr(dlinen, "_dropout", fixed_dropout)
  got = dora_jax.wrap(model.apply, cfg)(params, ad, x, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(got, np_mlp(np.asarray(x), params, ad, cfg, masks, rate), rtol=1e-5, atol=1e-5)
  assert calls == [rate, rate]


def test_dropout_only_with_rng_and_is_random():
  model, x, params, cfg, ad = make_mlp(use_dora=True, init=False, dropout=0.5)
  f = dora_jax.wrap(model.apply, cfg)
  det = f(params, ad, x)
  np.testing.assert_allclose(det, np_mlp(np.asarray(x), params, ad, cfg), rtol=1e-5, atol=1e-5)
  y1 = f(params, ad, x, rngs={"dropout": jax.random.key(1)})
  y2 = f(params, ad, x, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(y1, det) and not np.allclose(y1, y2)


@pytest.mark.parametrize("use_dora", [True, False])
def test_init_equals_base(use_dora):
  model, x, params, cfg, ad = make_mlp(use_dora=use_dora, init=True)
  base = model.apply({"params": params}, x)
  np.testing.assert_allclose(dora_jax.wrap(model.apply, cfg)(params, ad, x), base, atol=1e-6)
  if use_dora:  # m starts at ||W0||_c, so g = m / n is 1 at init.
    w = np.asarray(params["up"]["kernel"], np.float64)
    np.testing.assert_allclose(ad["up"]["magnitude"], np.sqrt((w ** 2).sum(0)), rtol=1e-6)
    assert not np.any(ad["up"]["lora_b"]) and np.any(ad["up"]["lora_a"])


def test_kaiming_and_gaussian_init_statistics():
  params = {"p": {"kernel": jnp.zeros((400, 300))}}
  ad = dora_jax.init_adapters(jax.random.key(0), params, dora_jax.LoraConfig(r=64, target_modules=["p"]))
  a = np.asarray(ad["p"]["lora_a"])
  bound = 1 / math.sqrt(400)  # torch kaiming_uniform_(a=sqrt(5)) on lora_A [r, I]
  assert a.min() >= -bound and a.max() <= bound and a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
  g = dora_jax.init_adapters(jax.random.key(0), params,
                             dora_jax.LoraConfig(r=64, target_modules=["p"], init_lora_weights="gaussian"))
  assert np.asarray(g["p"]["lora_a"]).std() == pytest.approx(1 / 64, rel=0.05)


def test_factored_norm_equals_materialized():
  w0, a, b = rand(37, 23), rand(37, 5), rand(5, 23)
  s = 0.7
  expected = np.sqrt(((w0.astype(np.float64) + s * a.astype(np.float64) @ b) ** 2).sum(0))
  np.testing.assert_allclose(core.factored_column_norm(w0, a, b, s), expected, rtol=1e-5)
  cached = core.column_norm_sq(w0)
  np.testing.assert_allclose(core.factored_column_norm(w0, a, b, s, cached), expected, rtol=1e-5)


def test_zero_norm_columns_do_not_give_nan():
  w0 = rand(6, 4)
  w0[:, 1] = 0.0
  params = {"p": {"kernel": jnp.asarray(w0), "bias": jnp.zeros(4)}}
  cfg = dora_jax.LoraConfig(r=2, target_modules=["p"], use_dora=True)
  ad = dora_jax.init_adapters(jax.random.key(0), params, cfg)
  assert np.all(np.isfinite(ad["p"]["magnitude"]))
  model = nn.Dense(4, name="p")

  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="p")(x)

  x = jnp.asarray(rand(3, 6))
  f = dora_jax.wrap(Wrap().apply, cfg)
  y = f(params, ad, x)
  grads = jax.grad(lambda a_: f(params, a_, x).sum())(ad)
  assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  merged = dora_jax.merge(params, ad, cfg)
  assert np.all(np.isfinite(merged["p"]["kernel"]))
  del model


def test_gradients_follow_the_papers_stop_gradient_formulas():
  # One DoRA Dense: y = g ⊙ (x W0 + s (xA)B) + b with g = m / n, n detached.
  model, x, params, cfg, ad = make_mlp(use_dora=True, init=False)
  p, a_ = params["up"], ad["up"]
  x64 = np.asarray(x, np.float64)
  w0 = np.asarray(p["kernel"], np.float64)
  A, B, m = (np.asarray(a_[k], np.float64) for k in ("lora_a", "lora_b", "magnitude"))
  s = cfg.scale
  n = np.sqrt(((w0 + s * A @ B) ** 2).sum(0))
  dy = rand(7, 6).astype(np.float64)

  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name="up")(x)

  f = dora_jax.wrap(One().apply, cfg)
  single = {"up": ad["up"]}
  grads = jax.grad(lambda ad_: jnp.sum(f({"up": p}, ad_, x) * dy))(single)["up"]

  u = x64 @ w0 + s * (x64 @ A) @ B
  grad_m = (dy * u / n).sum(0)  # ∇m = Σ_t dy ⊙ u / n
  grad_w = x64.T @ dy  # ∇_{W'} L
  grad_v = (m / n) * grad_w  # ∇_{V'} L = (m/n) ∇_{W'} L
  np.testing.assert_allclose(grads["magnitude"], grad_m, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads["lora_a"], s * grad_v @ B.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads["lora_b"], s * A.T @ grad_v, rtol=1e-4, atol=1e-5)

  # Finite differences: ∇m is exact (n does not depend on m); for A and B the
  # reference is the loss with n held at its current value (the detached norm).
  def loss_np(A_, B_, m_, n_fixed=None):
    nn_ = np.sqrt(((w0 + s * A_ @ B_) ** 2).sum(0)) if n_fixed is None else n_fixed
    y = (m_ / nn_) * (x64 @ w0 + s * (x64 @ A_) @ B_)
    return float((y * dy).sum())

  eps = 1e-6
  for (i, j) in [(0, 0), (3, 1)]:
    Ap = A.copy(); Ap[i, j] += eps
    Am = A.copy(); Am[i, j] -= eps
    fd = (loss_np(Ap, B, m, n) - loss_np(Am, B, m, n)) / (2 * eps)
    assert grads["lora_a"][i, j] == pytest.approx(fd, rel=1e-3, abs=1e-4)
  for k in [0, 4]:
    mp = m.copy(); mp[k] += eps
    mm = m.copy(); mm[k] -= eps
    fd = (loss_np(A, B, mp) - loss_np(A, B, mm)) / (2 * eps)
    assert grads["magnitude"][k] == pytest.approx(fd, rel=1e-3, abs=1e-4)


def test_lora_gradients_match_finite_differences():
  model, x, params, cfg, ad = make_mlp(use_dora=False, init=False)
  f = dora_jax.wrap(model.apply, cfg)
  loss = lambda ad_: jnp.sum(f(params, ad_, x) ** 2)
  grads = jax.grad(loss)(ad)
  ref = np.asarray(ad["down"]["lora_b"], np.float64)

  def loss_np(bmat):
    ad64 = jax.tree.map(lambda t: np.asarray(t, np.float64), ad)
    ad64["down"]["lora_b"] = bmat
    return float((np_mlp(np.asarray(x, np.float64), params, ad64, cfg) ** 2).sum())

  eps = 1e-6
  for (i, j) in [(0, 0), (1, 3)]:
    bp = ref.copy(); bp[i, j] += eps
    bm = ref.copy(); bm[i, j] -= eps
    fd = (loss_np(bp) - loss_np(bm)) / (2 * eps)
    assert grads["down"]["lora_b"][i, j] == pytest.approx(fd, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("use_dora", [True, False])
def test_merge_unmerge_roundtrip(use_dora):
  model, x, params, cfg, ad = make_mlp(use_dora=use_dora, init=False)
  merged, norms = dora_jax.merge(params, ad, cfg, return_norms=True)
  back = dora_jax.unmerge(merged, ad, cfg, norms)
  for path in ("up", "down"):
    np.testing.assert_allclose(back[path]["kernel"], params[path]["kernel"], rtol=1e-5, atol=1e-5)
  if use_dora:
    with pytest.raises(ValueError, match="return_norms=True"):
      dora_jax.unmerge(merged, ad, cfg)
    # The merged kernel's column norms are the magnitudes (paper eq. 5).
    np.testing.assert_allclose(core.column_norm(merged["up"]["kernel"]), ad["up"]["magnitude"], rtol=1e-5)


def test_decompose_is_the_papers_decomposition():
  model, x, params, cfg, ad = make_mlp()
  mags, dirs = dora_jax.decompose(params, cfg)
  w = np.asarray(params["up"]["kernel"], np.float64)
  np.testing.assert_allclose(mags["up"], np.linalg.norm(w, axis=0), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(dirs["up"]), axis=0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(mags["up"]) * np.asarray(dirs["up"]), w, rtol=1e-5, atol=1e-6)
  dm, dd = core.decomposition_shift(w, w * np.linspace(1, 2, w.shape[1]))
  assert float(dd) == pytest.approx(0.0, abs=1e-6) and float(dm) > 0


# ---------------------------------------------------------------------------
# Other layer types and transforms


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    h = nn.Dense(8, name="fc")(x)
    return x + nn.Dense(x.shape[-1], name="proj")(jax.nn.gelu(h)), None


class Stack(nn.Module):
  layers: int = 3
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Block) if self.remat else Block
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      length=self.layers)
    y, _ = scanned(name="layers")(x, None)
    return y


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_model_matches_per_layer_reference(remat):
  model = Stack(remat=remat)
  x = jnp.asarray(rand(2, 5, 4))
  params = model.init(jax.random.key(0), x)["params"]
  cfg = dora_jax.LoraConfig(r=2, target_modules=["fc", "proj"], use_dora=True, init_lora_weights=False)
  layouts = dora_jax.kernel_layouts(model, x)
  assert layouts["layers/fc"] == dora_jax.KernelLayout(stack=1, inputs=1)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=layouts)
  assert ad["layers"]["fc"]["lora_a"].shape == (3, 4, 2) and ad["layers"]["fc"]["magnitude"].shape == (3, 8)
  with pytest.raises(ValueError, match="kernel_layouts"):
    dora_jax.init_adapters(jax.random.key(1), params, cfg)
  got = jax.jit(dora_jax.wrap(model.apply, cfg))(params, ad, x)
  # Reference: layer by layer in numpy with PEFT's formula.
  h = np.asarray(x, np.float64).reshape(-1, 4)
  lp, la = params["layers"], ad["layers"]
  for i in range(3):
    fc = np_peft_linear(h, lp["fc"]["kernel"][i], np.asarray(lp["fc"]["bias"][i]), la["fc"]["lora_a"][i],
                        la["fc"]["lora_b"][i], cfg.scale, la["fc"]["magnitude"][i])
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(fc, jnp.float32)), np.float64)
    h = h + np_peft_linear(gelu, lp["proj"]["kernel"][i], np.asarray(lp["proj"]["bias"][i]),
                           la["proj"]["lora_a"][i], la["proj"]["lora_b"][i], cfg.scale, la["proj"]["magnitude"][i])
  np.testing.assert_allclose(got.reshape(-1, 4), h, rtol=1e-4, atol=1e-4)
  merged = dora_jax.merge(params, ad, cfg)
  np.testing.assert_allclose(model.apply({"params": merged}, x), got, rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda a_: jnp.sum(dora_jax.wrap(model.apply, cfg)(params, a_, x) ** 2)))(ad)
  assert all(np.all(np.isfinite(g)) and np.any(g) for g in jax.tree.leaves(grads))


class Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((2, 3), name="q")(x)  # [B, T, 2, 3]
    e = nn.Einsum((2, 3, 4), "btnh,nhd->btd", name="o")(q)
    k = nn.Einsum((4, 2, 3), "btd,dnh->bhtn", name="k", use_bias=True)(e)  # outputs reordered
    return nn.DenseGeneral(4, axis=(1, -1), name="out")(k)


@pytest.mark.parametrize("use_dora", [True, False])
def test_densegeneral_and_einsum_match_merged(use_dora):
  model = Attn()
  x = jnp.asarray(rand(2, 3, 4))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: t + 0.1 * jnp.asarray(rand(*t.shape)), params)
  cfg = dora_jax.LoraConfig(r=2, target_modules=["q", "o", "k", "out"], use_dora=use_dora, init_lora_weights=False)
  layouts = dora_jax.kernel_layouts(model, x)
  assert layouts["q"] == dora_jax.KernelLayout(0, 1) and layouts["o"] == dora_jax.KernelLayout(0, 2)
  assert layouts["out"] == dora_jax.KernelLayout(0, 2)
  assert params["k"]["bias"].shape == (3, 2)  # Flax stores an Einsum bias in output order
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=layouts)
  assert ad["o"]["lora_a"].shape == (6, 2) and ad["k"]["lora_b"].shape == (2, 6)
  if use_dora:
    ad = {k: {**v, "magnitude": v["magnitude"] * jnp.linspace(0.7, 1.3, v["magnitude"].shape[-1])}
          for k, v in ad.items()}
  got = dora_jax.wrap(model.apply, cfg)(params, ad, x)
  merged = dora_jax.merge(params, ad, cfg)
  np.testing.assert_allclose(got, model.apply({"params": merged}, x), rtol=1e-5, atol=1e-5)


class ConvEmbed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    e = nn.Embed(11, 4, name="embed")(ids)  # [B, T, 4]
    return nn.Conv(3, (2,), name="conv")(e)


def test_conv_and_embed_run_factored_equal_to_merged_weight(caplog):
  model = ConvEmbed()
  ids = jnp.asarray(RNG.integers(0, 11, (2, 5)))
  params = model.init(jax.random.key(0), ids)["params"]
  cfg = dora_jax.LoraConfig(r=2, target_modules=["embed", "conv"], use_dora=True, init_lora_weights=False)
  layouts = dora_jax.kernel_layouts(model, ids)
  assert layouts["conv"] == dora_jax.KernelLayout(0, 2)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=layouts)
  dlinen._said_merged.clear()
  with caplog.at_level("WARNING", logger="dora_jax"):
    got = dora_jax.wrap(model.apply, cfg)(params, ad, ids)
  assert "merged weight" not in caplog.text  # factored forwards (tests/test_conv_embed.py)
  merged = dora_jax.merge(params, ad, cfg)
  np.testing.assert_allclose(got, model.apply({"params": merged}, ids), rtol=1e-5, atol=1e-5)
  # Embedding DoRA norm: per embedding dimension across the vocabulary.
  w = np.asarray(merged["embed"]["embedding"])
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), ad["embed"]["magnitude"], rtol=1e-5)


# ---------------------------------------------------------------------------
# Training


def test_training_lowers_loss_and_keeps_base_bitwise():
  model, x, params, cfg, ad = make_mlp(use_dora=True, init=True)
  target = jnp.asarray(rand(7, 5))
  f = dora_jax.wrap(model.apply, cfg)

  def loss_fn(p, a, batch, rng):
    return jnp.mean((f(p, a, batch[0]) - batch[1]) ** 2)

  tx = optax.adam(3e-2)
  step = dora_jax.make_train_step(loss_fn, tx, donate=False)
  opt_state = tx.init(ad)
  before = jax.tree.map(np.array, params)
  losses = []
  for i in range(15):
    ad, opt_state, metrics = step(params, ad, opt_state, (x, target), jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, jax.tree.map(np.array, params))


def test_freeze_base_over_combined_tree_keeps_base_bitwise():
  model, x, params, cfg, ad = make_mlp(use_dora=True, init=True)
  target = jnp.asarray(rand(7, 5))
  combined = dora_jax.combine(params, ad)
  tx = dora_jax.freeze_base(optax.adamw(3e-2, weight_decay=0.1, mask=dora_jax.weight_decay_mask))
  state = tx.init(combined)

  def loss(tree):
    p, a = dora_jax.split(tree)
    return jnp.mean((dora_jax.wrap(model.apply, cfg)(p, a, x) - target) ** 2)

  @jax.jit
  def step(tree, state):
    l, g = jax.value_and_grad(loss)(tree)
    u, state = tx.update(g, state, tree)
    return optax.apply_updates(tree, u), state, l

  first = None
  for _ in range(10):
    combined, state, l = step(combined, state)
    first = first if first is not None else float(l)
  p2, a2 = dora_jax.split(combined)
  jax.tree.map(np.testing.assert_array_equal, params, p2)
  assert float(l) < first
  labels = dora_jax.adapter_labels(combined)
  assert labels["up"]["kernel"] == "frozen" and labels["up"]["magnitude"] == "adapter"
  mask = dora_jax.weight_decay_mask(combined)
  assert mask["up"]["lora_a"] and not mask["up"]["magnitude"] and not mask["up"]["kernel"]


# ---------------------------------------------------------------------------
# Errors


def test_errors_name_the_problem():
  model, x, params, cfg, ad = make_mlp()
  with pytest.raises(ValueError, match=r"matches no module[\s\S]*down[\s\S]*up"):
    dora_jax.init_adapters(jax.random.key(0), params, dora_jax.LoraConfig(target_modules=["q_proj"]))
  with pytest.raises(ValueError, match="positive integer"):
    dora_jax.LoraConfig(r=0, target_modules=["up"])
  with pytest.raises(ValueError, match="at most 4"):
    dora_jax.init_adapters(jax.random.key(0), params, dora_jax.LoraConfig(r=5, target_modules=["up"]))
  with pytest.raises(ValueError, match="target_modules is required"):
    dora_jax.LoraConfig(r=2)
  bad = jax.tree.map(lambda t: t, ad)
  bad["up"]["lora_a"] = jnp.zeros((3, 2))
  with pytest.raises(ValueError, match="'up'"):
    dora_jax.wrap(model.apply, cfg)(params, bad, x)
  with pytest.raises(ValueError, match="'nope'.*no kernel"):
    dora_jax.wrap(model.apply, cfg)(params, {**ad, "nope": ad["up"]}, x)
  bad = jax.tree.map(lambda t: t, ad)
  bad["up"]["magnitude"] = jnp.zeros((3,))
  with pytest.raises(ValueError, match="magnitude has shape"):
    dora_jax.merge(params, bad, cfg)


def test_regex_and_exclude_targets():
  model, x, params, cfg, ad = make_mlp()
  assert dora_jax.select_targets(params, dora_jax.LoraConfig(target_modules="u.")) == ["up"]
  assert dora_jax.select_targets(
      params, dora_jax.LoraConfig(target_modules="all-linear", exclude_modules=["down"])) == ["up"]
  nested = {"model": {"layers_0": {"self_attn": {"q_proj": params["up"]}}}}
  assert dora_jax.select_targets(nested, dora_jax.LoraConfig(target_modules=["self_attn.q_proj"])) == [
      "model/layers_0/self_attn/q_proj"]
