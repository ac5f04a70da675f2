"""The NNX path (module wrapping and the functional route) against a numpy PEFT reference."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from dora_jax import nnx as dn

RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
  return (RNG.standard_normal(shape) * scale).astype(np.float32)


def np_init(key, shape, dtype=jnp.float32):
  """A numpy initializer: no per-shape XLA compile (keeps the file fast on CPU)."""
  return jnp.asarray(rand(*shape, scale=1.0 / math.sqrt(shape[0])), dtype)


INIT = dict(kernel_init=np_init, bias_init=np_init)  # nonzero biases: never rescaled


# ---------------------------------------------------------------------------
# Independent numpy reference of PEFT's LoRA / DoRA linear forward (our layout:
# W0 [I, O], A [I, r], B [r, O]; PEFT's torch layout is the transpose).


def np_peft_linear(x, w0, bias, a, b, s, m=None, drop_mask=None, rate=0.0):
  """PEFT's LoraLayer / DoraLinearLayer forward in float64; ``x: [N, I]``."""
  x, w0, a, b = (np.asarray(t, np.float64) for t in (x, w0, a, b))
  bias = 0.0 if bias is None else np.asarray(bias, np.float64)
  result = x @ w0 + bias
  xd = x if drop_mask is None else x * drop_mask / (1.0 - rate)
  lora = xd @ a @ b
  if m is None:
    return result + s * lora
  norm = np.sqrt(((w0 + s * a @ b) ** 2).sum(axis=0))
  g = np.asarray(m, np.float64) / norm
  base = result - bias if drop_mask is None else xd @ w0
  return result + (g - 1) * base + g * lora * s


class Net(nnx.Module):
  """nnx.Linear (bias) -> nnx.LinearGeneral (2 in, 2 out axes) -> nnx.Einsum."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(4, 6, rngs=rngs, **INIT)
    self.mix = nnx.LinearGeneral((2, 3), (3, 2), axis=(-2, -1), rngs=rngs, **INIT)
    self.head = nnx.Einsum("bij,ijo->bo", (3, 2, 5), (5,), rngs=rngs, **INIT)

  def __call__(self, x):
    h = jnp.tanh(self.up(x)).reshape(x.shape[0], 2, 3)
    return self.head(self.mix(h))


class LinenNet(nn.Module):
  """The same network in Linen (same param names and shapes)."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(6, name="up")(x)).reshape(x.shape[0], 2, 3)
    h = nn.DenseGeneral((3, 2), axis=(-2, -1), name="mix")(h)
    return nn.Einsum((3, 2, 5), "bij,ijo->bo", name="head")(h)


def make_net(use_dora=True, r=2, init=False, dropout=0.0, rslora=False, seed=0):
  model = Net(nnx.Rngs(seed))
  cfg = dora_jax.LoraConfig(r=r, lora_alpha=3.0, target_modules=["up", "mix", "head"],
                            use_dora=use_dora, init_lora_weights=init, lora_dropout=dropout,
                            use_rslora=rslora)
  return model, cfg


def np_net(x, params, ad, cfg, masks=None, rate=0.0):
  """Each layer as a matrix: ``[N, I] @ [I, O]`` with the kernels flattened."""
  s = cfg.scale
  mask = lambda i: None if masks is None else masks[i].reshape(masks[i].shape[0], -1)

  def layer(h, name, i):
    p, a = params[name], ad[name]
    w = np.asarray(p["kernel"]).reshape(a["lora_a"].shape[0], -1)
    return np_peft_linear(h, w, np.asarray(p["bias"]).reshape(-1), a["lora_a"], a["lora_b"], s,
                          a.get("magnitude"), mask(i), rate)

  h = np.tanh(layer(np.asarray(x), "up", 0))
  return layer(layer(h, "mix", 1), "head", 2)


def jiggle_magnitudes(model):
  """Moves m off ||W0 + sAB||_c (where init puts it), so g != 1 and DoRA's own terms count."""
  for _, w in dn.wrappers(model):
    if w.magnitude is not None:
      m = np.asarray(w.magnitude[...])
      w.magnitude[...] = jnp.asarray(m * (1.0 + 0.3 * rand(*m.shape)))


X = rand(3, 4)


# ---------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("use_dora", [True, False])
def test_default_init_equals_base(use_dora):
  model, cfg = make_net(use_dora=use_dora, init=True)
  base = model(X)
  w_up = np.asarray(model.up.kernel[...], np.float64)
  assert dn.apply_adapters(model, cfg, nnx.Rngs(1)) is model
  assert isinstance(model.up, dn.AdaptedLinear) and isinstance(model.up.base_layer, nnx.Linear)
  np.testing.assert_allclose(model(X), base, atol=1e-6)
  if use_dora:  # m starts at ||W0||_c so g = 1
    np.testing.assert_allclose(model.up.magnitude[...], np.sqrt((w_up ** 2).sum(0)), rtol=1e-6)
  else:
    assert model.up.magnitude is None
  assert not np.any(model.head.lora_b[...]) and np.any(model.head.lora_a[...])


@pytest.mark.parametrize("use_dora,rslora", [(True, False), (False, False), (True, True)])
def test_matches_numpy_peft_linen_and_merge(use_dora, rslora):
  model, cfg = make_net(use_dora=use_dora, rslora=rslora)
  base = nnx.clone(model)
  params = dn.param_dict(model)
  dn.apply_adapters(model, cfg, nnx.Rngs(params=7))
  # The wrapped model's params keep the base layout; its adapters are init_adapters' own.
  jax.tree.map(np.testing.assert_array_equal, dn.param_dict(model), params)
  key = nnx.Rngs(params=7).params()
  same = dora_jax.init_adapters(key, params, cfg, layouts=dn.kernel_layouts(base))
  jax.tree.map(np.testing.assert_array_equal, same, dn.adapter_dict(model))

  jiggle_magnitudes(model)
  ad = dn.adapter_dict(model)
  expected = np_net(X, params, ad, cfg)
  got = model(X)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

  # The Linen path on the same params and adapters.
  linen = dora_jax.wrap(LinenNet().apply, cfg)(params, ad, jnp.asarray(X))
  np.testing.assert_allclose(linen, got, rtol=1e-5, atol=1e-5)

  # The merged routes: tree merge on the NNX state, functional_apply, merge_adapters.
  graphdef, state = nnx.split(base)
  merged = dora_jax.merge(dn.param_dict(state), ad, cfg)
  np.testing.assert_allclose(nnx.merge(graphdef, nnx.State(merged))(X), got, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dn.functional_apply(graphdef, state, ad, cfg, X), got, rtol=1e-5, atol=1e-5)
  out = dn.merge_adapters(model)
  assert type(out.up) is nnx.Linear and type(out.mix) is nnx.LinearGeneral and type(out.head) is nnx.Einsum
  assert not jax.tree.leaves(nnx.state(out, dn.Adapter))
  np.testing.assert_allclose(out(X), got, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               dn.param_dict(out), merged)


@pytest.mark.parametrize("equation,kernel,bias,x_shape", [
    ("nta,hab->nthb", (3, 2, 4), (3, 4), (2, 5, 2)),  # the Flax docstring example: kernel [h, a, b]
    ("...d,dkh->...hk", (4, 2, 3), (3, 2), (2, 5, 4)),  # ellipsis; outputs in another order
])
def test_einsum_kernel_axis_orders(equation, kernel, bias, x_shape):
  layer = nnx.Einsum(equation, kernel, bias, rngs=nnx.Rngs(0), **INIT)
  x = rand(*x_shape)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=2.0, target_modules=".*", use_dora=True,
                            init_lora_weights=False)
  w0, b0 = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
  wrapped = dn.apply_adapters(layer, cfg, nnx.Rngs(3))  # the root module itself
  assert isinstance(wrapped, dn.AdaptedLinear)
  jiggle_magnitudes(wrapped)
  ad = {k: np.asarray(v, np.float64) for k, v in dn.adapter_dict(wrapped).items()}
  # Reference in numpy einsum on the full kernel: A [I, r] and B [r, O] flatten the
  # kernel's input / output letters in kernel order; the norm runs over the inputs.
  rhs, out = equation.split(",")[1].split("->")
  ins = "".join(c for c in rhs if c not in out)
  outs = "".join(c for c in rhs if c in out)
  size = dict(zip(rhs, kernel))
  a = ad["lora_a"].reshape(*[size[c] for c in ins], -1)
  b = ad["lora_b"].reshape(-1, *[size[c] for c in outs])
  v = w0 + cfg.scale * np.einsum(f"{ins}R,R{outs}->{rhs}", a, b)
  norm = np.sqrt(np.einsum(f"{rhs},{rhs}->{outs}", v, v))
  w_merged = np.einsum(f"{rhs},{outs}->{rhs}", v, ad["magnitude"].reshape(norm.shape) / norm)
  bias_shape = [size[c] if c in rhs else 1 for c in out.replace("...", "")]
  bias_shape = [1] * (x.ndim - len(equation.split(",")[0].replace("...", ""))) * ("..." in out) + bias_shape
  want = np.einsum(equation, x.astype(np.float64), w_merged) + b0.reshape(bias_shape)
  got = wrapped(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  merged = dn.merge_adapters(wrapped)
  assert type(merged) is nnx.Einsum
  np.testing.assert_allclose(merged(x), got, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Training


def test_optimizer_trains_adapters_only():
  model, cfg = make_net(use_dora=True, init=True)
  dn.apply_adapters(model, cfg, nnx.Rngs(1))
  frozen = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  start = jax.tree.map(np.array, nnx.to_pure_dict(dn.adapter_state(model)))
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=dn.Adapter)
  y = jnp.asarray(rand(3, 5))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, dn.Adapter))(model)
    optimizer.update(model, grads)
    return loss, grads

  losses = []
  for _ in range(6):
    loss, grads = step(model, optimizer, jnp.asarray(X), y)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses
  assert {type(v) for _, v in nnx.to_flat_state(grads)} == {dn.Adapter}
  assert not isinstance(model.up.lora_a, nnx.Param) and isinstance(model.up.base_layer.kernel, nnx.Param)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, after, frozen)  # bitwise
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                       nnx.to_pure_dict(dn.adapter_state(model)), start)
  assert all(jax.tree.leaves(moved))


class One(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(5, 4, rngs=rngs, **INIT)

  def __call__(self, x):
    return self.proj(x)


def test_magnitude_gradient_is_the_papers_and_merged_route_agrees():
  model = One(nnx.Rngs(0))
  base = nnx.clone(model)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=2.0, target_modules=["proj"], use_dora=True,
                            init_lora_weights=False)
  dn.apply_adapters(model, cfg, nnx.Rngs(2))
  jiggle_magnitudes(model)
  x, dy = rand(6, 5), rand(6, 4)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * dy), argnums=nnx.DiffState(0, dn.Adapter)))(model)
  ad = dn.adapter_dict(model)
  w0 = np.asarray(base.proj.kernel[...], np.float64)
  a, b = np.asarray(ad["proj"]["lora_a"], np.float64), np.asarray(ad["proj"]["lora_b"], np.float64)
  s = cfg.scale
  u = x @ w0 + s * (x @ a) @ b  # bias-free
  n = np.sqrt(((w0 + s * a @ b) ** 2).sum(0))
  np.testing.assert_allclose(grads["proj"]["magnitude"][...], (dy * u).sum(0) / n, rtol=1e-5)

  graphdef, state = nnx.split(base)
  merged_grads = jax.jit(jax.grad(
      lambda ad_: jnp.sum(dn.functional_apply(graphdef, state, ad_, cfg, x) * dy)))(ad)
  jax.tree.map(lambda g1, g2: np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5),
               dn._str_keys(nnx.to_pure_dict(grads)),
               merged_grads)


# ---------------------------------------------------------------------------
# Dropout


class FixedMask(nnx.Module):
  """Stands in for the adapter's nnx.Dropout with a known mask."""

  def __init__(self, mask, rate):
    self.mask = nnx.data(jnp.asarray(mask))
    self.rate = rate
    self.deterministic = False

  def __call__(self, x):
    return x * self.mask / (1.0 - self.rate)


def test_dropout_form_matches_peft():
  rate = 0.4
  model, cfg = make_net(use_dora=True, dropout=rate)
  params = dn.param_dict(model)
  dn.apply_adapters(model, cfg, nnx.Rngs(0))
  jiggle_magnitudes(model)
  masks = [(RNG.random(s) > rate).astype(np.float32) for s in [(3, 4), (3, 2, 3), (3, 3, 2)]]
  for name, mask in zip(["up", "mix", "head"], masks):
    getattr(model, name).lora_dropout = FixedMask(mask, rate)
  expected = np_net(X, params, dn.adapter_dict(model), cfg, masks, rate)
  np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_train_mode():
  model, cfg = make_net(use_dora=True, dropout=0.5)
  params = dn.param_dict(model)
  dn.apply_adapters(model, cfg, nnx.Rngs(0))
  jiggle_magnitudes(model)
  assert isinstance(model.up.lora_dropout, nnx.Dropout)
  expected = np_net(X, params, dn.adapter_dict(model), cfg)
  y1, y2 = model(X), model(X)  # NNX default: dropout active until eval()
  assert not np.allclose(y1, expected, atol=1e-4) and not np.allclose(y1, y2, atol=1e-4)
  model.eval()
  np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-5)
  model.train()
  assert not np.allclose(model(X), expected, atol=1e-4)
  view = nnx.view(model, deterministic=True)
  np.testing.assert_allclose(view(X), expected, rtol=1e-5, atol=1e-5)
  quiet = dn.apply_adapters(Net(nnx.Rngs(0)), cfg, nnx.Rngs(0), deterministic=True)
  assert quiet.up.lora_dropout.deterministic


# ---------------------------------------------------------------------------
# Errors


def test_no_match_lists_paths():
  model, _ = make_net()
  cfg = dora_jax.LoraConfig(r=2, target_modules=["q_proj"])
  with pytest.raises(ValueError, match="matches no module") as err:
    dn.apply_adapters(model, cfg, nnx.Rngs(0))
  for listed in ["up (Linear)", "mix (LinearGeneral)", "head (Einsum)"]:
    assert listed in str(err.value)


def test_rank_too_large():
  model, _ = make_net()
  with pytest.raises(ValueError, match=r"r=6 is larger than the module 'head' allows.*at most 5"):
    dn.apply_adapters(model, dora_jax.LoraConfig(r=6, target_modules=["head"]), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"r=5 is larger than the module 'up' allows.*at most 4"):
    dn.apply_adapters(model, dora_jax.LoraConfig(r=5, target_modules=["up"]), nnx.Rngs(0))
  assert type(model.up) is nnx.Linear  # nothing replaced on error


class WithConv(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3,), feature_group_count=2, rngs=rngs, **INIT)
    self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs, **INIT) for _ in range(2)])
    self.batched = nnx.Einsum("bhd,hdk->bhk", (2, 3, 4), rngs=rngs, kernel_init=np_init)


def test_unsupported_and_repeated_targets():
  model = WithConv(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"nnx\.Conv at 'conv' is grouped"):
    dn.apply_adapters(model, dora_jax.LoraConfig(r=2, target_modules=["conv"]), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'batched'.*batch axes"):
    dn.apply_adapters(model, dora_jax.LoraConfig(r=2, target_modules=["batched"]), nnx.Rngs(0))
  cfg = dora_jax.LoraConfig(r=2, target_modules=r"layers/\d+")  # list entries by index
  dn.apply_adapters(model, cfg, nnx.Rngs(0))
  assert all(isinstance(l, dn.AdaptedLinear) for l in model.layers)
  assert set(dn.adapter_dict(model)["layers"]) == {"0", "1"}
  with pytest.raises(ValueError, match="already has adapters"):
    dn.apply_adapters(model, cfg, nnx.Rngs(0))
  with pytest.raises(ValueError, match="matches no module"):  # all-linear skips wrapped layers
    dn.apply_adapters(model, dora_jax.LoraConfig(r=2, target_modules="all-linear",
                                                 exclude_modules=["batched"]), nnx.Rngs(0))
  dn.merge_adapters(model)
  assert all(type(l) is nnx.Linear for l in model.layers)
