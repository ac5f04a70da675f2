"""No NaN on any DoRA path: zero and underflowing magnitudes, zero-norm columns, low precision."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax

RNG = np.random.default_rng(11)


class Net(nn.Module):
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="up", use_bias=self.use_bias)(x)
    return nn.Dense(3, name="down")(jnp.tanh(h))


@pytest.mark.parametrize("origin", ["zero_magnitude", "underflow", "dead_column"])
@pytest.mark.parametrize("adapter_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("path", ["custom_vjp", "factored", "merged"])
def test_finite_gradients_equal_to_the_reference(origin, adapter_dtype, path):
  model, x = Net(), jnp.asarray(RNG.standard_normal((5, 4)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  if origin == "dead_column":  # a unit whose base column is all zeros
    params["up"]["kernel"] = params["up"]["kernel"].at[:, 2].set(0.0)
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up"], use_dora=True, init_lora_weights=False,
                            adapter_dtype=adapter_dtype)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  m = ad["up"]["magnitude"]
  if origin == "zero_magnitude":  # e.g. imported from PEFT, or a pruned unit
    m = m.at[1].set(0.0)
  elif origin == "underflow":
    m = m.at[1].set(jnp.asarray(1e-30, jnp.float32).astype(adapter_dtype))
  ad["up"]["magnitude"] = m.astype(adapter_dtype)
  f = dora_jax.wrap(model.apply, cfg, dora_path=path)
  grads = jax.grad(lambda a: jnp.sum(f(params, a, x)))(ad)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  ref = jax.grad(lambda a: jnp.sum(dora_jax.wrap(model.apply, cfg, dora_path="factored")(params, a, x)))(ad)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("path", ["custom_vjp", "factored"])
def test_biased_layer_with_zero_magnitude_stays_finite(path):
  model, x = Net(use_bias=True), jnp.asarray(RNG.standard_normal((5, 4)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up"], use_dora=True)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  ad["up"]["magnitude"] = ad["up"]["magnitude"].at[1].set(0.0)
  grads = jax.grad(lambda a: jnp.sum(dora_jax.wrap(model.apply, cfg, dora_path=path)(params, a, x)))(ad)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(grads))


@pytest.mark.parametrize("path", ["custom_vjp", "factored"])
def test_biased_layer_magnitude_gradient_is_exact_near_zero(path):
  """∇m = Σ_t dy ⊙ u / n for magnitudes 0, 1e-30 (underflow) and 1e-6 next to a bias of
  ~3 (numpy, float64): the lean path must not read g·u back out of y − b."""

  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name="up")(x)

  model, x = One(), jnp.asarray(RNG.standard_normal((3, 5, 4)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  params["up"]["bias"] = jnp.asarray(3.0 * RNG.standard_normal(6), jnp.float32)
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up"], use_dora=True, init_lora_weights=False)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  ad["up"]["magnitude"] = ad["up"]["magnitude"].at[1].set(0.0).at[3].set(1e-30).at[4].set(1e-6)
  dy = RNG.standard_normal((3, 5, 6)).astype(np.float32)
  f = dora_jax.wrap(model.apply, cfg, dora_path=path)
  got = jax.grad(lambda a: jnp.sum(f(params, a, x) * dy))(ad)["up"]["magnitude"]
  x64, w0 = np.asarray(x, np.float64).reshape(-1, 4), np.asarray(params["up"]["kernel"], np.float64)
  a, b = (np.asarray(ad["up"][k], np.float64) for k in ("lora_a", "lora_b"))
  u = x64 @ w0 + cfg.scale * (x64 @ a) @ b
  n = np.sqrt(((w0 + cfg.scale * a @ b) ** 2).sum(0))
  np.testing.assert_allclose(got, (dy.reshape(-1, 6) * u / n).sum(0), rtol=1e-5, atol=1e-5)
