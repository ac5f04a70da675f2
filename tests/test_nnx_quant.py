"""QLoRA / QDoRA on NNX modules: a quantized base against dequantize-then-reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import quant


class Net(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(32, 64, rngs=rngs)
    self.gate = nnx.LinearGeneral(32, (4, 16), use_bias=False, rngs=rngs)
    self.down = nnx.Linear(64, 32, rngs=rngs)
    self.lm_head = nnx.Linear(32, 5, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.up(x)) * self.gate(x).reshape(*x.shape[:-1], 64)
    return self.lm_head(x + self.down(h))


def _reference(model_q):
  """An independent float model: the same modules with each kernel replaced by
  ``quant.dequantize`` of the stored quantized kernel."""
  ref = Net(nnx.Rngs(0))
  for name in ("up", "gate", "down", "lm_head"):
    src, dst = getattr(model_q, name), getattr(ref, name)
    w = src.kernel.get_value()
    dst.kernel.set_value(quant.dequantize(w) if quant.is_quantized(w) else w)
    if getattr(src, "bias", None) is not None:
      dst.bias.set_value(src.bias.get_value())
  return ref


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("use_dora", [True, False])
def test_quantized_nnx_equals_dequantized_reference(method, use_dora):
  x = jax.random.normal(jax.random.key(0), (4, 32))
  model = dora_jax.nnx.quantize(Net(nnx.Rngs(0)), method=method)
  assert isinstance(model.up, dora_jax.nnx.QuantizedLinear) and isinstance(model.up, nnx.Linear)
  assert isinstance(model.gate, dora_jax.nnx.QuantizedLinearGeneral)
  assert not dora_jax.nnx.is_quantized_module(model.lm_head)  # all-linear leaves lm_head
  assert quant.is_quantized(model.down.kernel.get_value())
  ref = _reference(model)
  np.testing.assert_allclose(model(x), ref(x), rtol=1e-6, atol=1e-6)  # unadapted quantized modules

  cfg = dora_jax.LoraConfig(r=4, target_modules=["up", "gate"], use_dora=use_dora,
                            init_lora_weights=False)
  model = dora_jax.nnx.apply_adapters(model, cfg, nnx.Rngs(1))
  ref = dora_jax.nnx.apply_adapters(ref, cfg, nnx.Rngs(1))
  for name in ("up", "gate"):
    got, want = getattr(model, name).adapter(), getattr(ref, name).adapter()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  if use_dora:  # QDoRA (PEFT): m starts at the dequantized weight's column norm
    w = np.asarray(quant.dequantize(model.up.base_layer.kernel.get_value()), np.float64)
    a, b = (np.asarray(model.up.adapter()[k], np.float64) for k in ("lora_a", "lora_b"))
    np.testing.assert_allclose(model.up.adapter()["magnitude"],
                               np.sqrt(((w + cfg.scale * a @ b) ** 2).sum(0)), rtol=1e-5)

  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, dora_jax.nnx.Adapter)))
  np.testing.assert_allclose(nnx.jit(lambda m: m(x))(model), ref(x), rtol=1e-5, atol=1e-6)
  g, g_ref = grad(model), nnx.grad(loss, argnums=nnx.DiffState(0, dora_jax.nnx.Adapter))(ref)
  for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert len(jax.tree.leaves(g)) == len(jax.tree.leaves(g_ref)) > 0

  merged = dora_jax.nnx.merge_adapters(model)  # plain modules, full-precision W'
  assert type(merged.up) is nnx.Linear and type(merged.gate) is nnx.LinearGeneral
  assert not quant.is_quantized(merged.up.kernel.get_value())
  assert dora_jax.nnx.is_quantized_module(merged.down)  # not adapted: stays quantized
  np.testing.assert_allclose(merged(x), ref(x), rtol=1e-5, atol=1e-5)
  plain = dora_jax.nnx.dequantize(merged)
  assert not any(dora_jax.nnx.is_quantized_module(m) for _, m in nnx.iter_modules(plain))
  np.testing.assert_allclose(plain(x), ref(x), rtol=1e-5, atol=1e-5)


def test_backward_never_holds_the_dequantized_kernel():
  """Under ``jax.checkpoint`` the backward re-dequantizes W0 (down's, for up's gradient): no
  float kernel is kept as a residual."""
  x = jnp.ones((2, 32))
  model = dora_jax.nnx.quantize(Net(nnx.Rngs(0)), method="nf4", target_modules=["up", "down"])
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up"])
  model = dora_jax.nnx.apply_adapters(model, cfg, nnx.Rngs(1))
  graphdef, ad, rest = nnx.split(model, dora_jax.nnx.Adapter, ...)
  f = lambda a: jnp.sum(nnx.merge(graphdef, a, rest)(x))
  _, vjp = jax.vjp(f, ad)
  residuals = [l for l in jax.tree.leaves(vjp) if hasattr(l, "shape")]
  assert not any(tuple(l.shape) in ((32, 64), (64, 32)) for l in residuals), [
      (l.shape, l.dtype) for l in residuals]


def test_nnx_quantize_refusals():
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up"])
  adapted = dora_jax.nnx.apply_adapters(Net(nnx.Rngs(0)), cfg, nnx.Rngs(1))
  with pytest.raises(ValueError, match="already has adapters.*quantize the model first"):
    dora_jax.nnx.quantize(adapted, target_modules=["up"])
  q = dora_jax.nnx.quantize(Net(nnx.Rngs(0)), target_modules=["up"])
  with pytest.raises(ValueError, match="already quantized"):
    dora_jax.nnx.quantize(q, target_modules=["up"])
  with pytest.raises(ValueError, match="method='fp8' is not one of"):
    dora_jax.nnx.quantize(Net(nnx.Rngs(0)), method="fp8")

  class WithEmbed(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(10, 8, rngs=rngs)

  with pytest.raises(ValueError, match="Embed.*quantizes nnx.Linear"):
    dora_jax.nnx.quantize(WithEmbed(nnx.Rngs(0)), target_modules=["embed"])
  bad = Net(nnx.Rngs(0))
  bad.up.kernel.set_value(jnp.ones((32, 64), jnp.int8))
  with pytest.raises(ValueError, match="up/kernel.*int8"):
    dora_jax.nnx.quantize(bad, target_modules=["up"])
