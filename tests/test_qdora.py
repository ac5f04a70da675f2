"""QLoRA / QDoRA through the front-ends: a quantized base against dequantize-then-reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import quant


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(64, name="up")(x)
    return x + nn.Dense(32, name="down")(jnp.tanh(h)), None


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="layers")(x, None)
    return nn.Dense(5, name="head")(x)


@pytest.fixture(scope="module")
def setup():
  model, x = Net(), jax.random.normal(jax.random.key(0), (4, 32))
  params = model.init(jax.random.key(1), x)["params"]
  layouts = dora_jax.kernel_layouts(model, x)
  return model, x, params, layouts


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("use_dora", [True, False])
def test_quantized_base_equals_dequantized_reference(setup, method, use_dora):
  model, x, params, layouts = setup
  q = dora_jax.quantize(params, method=method, layouts=layouts)
  assert quant.is_quantized(q["layers"]["up"]["kernel"]) and quant.is_quantized(q["head"]["kernel"])
  deq = quant.dequantize_params(q)
  cfg = dora_jax.LoraConfig(r=4, target_modules=["up", "down"], use_dora=use_dora,
                            init_lora_weights=False)
  ad = dora_jax.init_adapters(jax.random.key(2), q, cfg, layouts=layouts)
  if use_dora:  # QDoRA (PEFT): the magnitude starts at the dequantized weight's column norm
    w = np.asarray(deq["layers"]["up"]["kernel"], np.float64)
    a, b = (np.asarray(ad["layers"]["up"][k], np.float64) for k in ("lora_a", "lora_b"))
    want = np.sqrt(((w + cfg.scale * a @ b) ** 2).sum(-2))
    np.testing.assert_allclose(ad["layers"]["up"]["magnitude"], want, rtol=1e-5)
  for path in ("custom_vjp", "factored", "merged"):
    f = dora_jax.wrap(model.apply, cfg, dora_path=path)
    np.testing.assert_allclose(jax.jit(f)(q, ad, x), f(deq, ad, x), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda a: jnp.sum(jnp.sin(f(q, a, x))))(ad)
    g_ref = jax.grad(lambda a: jnp.sum(jnp.sin(f(deq, a, x))))(ad)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  merged = dora_jax.merge(q, ad, cfg)  # full precision, adapted or not
  assert not any(quant.is_quantized(l) for l in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
  np.testing.assert_allclose(model.apply({"params": merged}, x), f(deq, ad, x), rtol=1e-5, atol=1e-5)


def test_step_never_holds_all_layers_dequantized(setup):
  """The base kernels are dequantized inside the scan, one layer at a time."""
  model, x, params, layouts = setup
  q = dora_jax.quantize(params, method="nf4", layouts=layouts)
  cfg = dora_jax.LoraConfig(r=4, target_modules=["up", "down"], use_dora=True)
  ad = dora_jax.init_adapters(jax.random.key(2), q, cfg, layouts=layouts)
  f = dora_jax.wrap(model.apply, cfg)
  hlo = jax.jit(jax.grad(lambda a: f(q, a, x).sum())).lower(ad).compile().as_text()
  assert "f32[3,32,64]" not in hlo and "f32[3,64,32]" not in hlo


def test_integer_kernel_is_refused(setup):
  model, x, params, layouts = setup
  bad = jax.tree.map(lambda t: t, params)
  bad["head"]["kernel"] = jnp.round(params["head"]["kernel"] * 100).astype(jnp.int8)
  cfg = dora_jax.LoraConfig(r=2, target_modules=["head"], use_dora=True)
  with pytest.raises(ValueError, match="head.*int8.*quantize"):
    dora_jax.init_adapters(jax.random.key(0), bad, cfg, layouts=layouts)
  ad = dora_jax.init_adapters(jax.random.key(0), params, cfg, layouts=layouts)
  with pytest.raises(ValueError, match="int8"):
    dora_jax.wrap(model.apply, cfg)(bad, ad, x)
