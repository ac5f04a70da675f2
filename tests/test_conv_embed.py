"""Factored Conv and Embed adapters (PEFT's Conv / Embedding LoRA and DoRA forms), Linen and NNX.

References: a jax.lax convolution / numpy lookup written here from PEFT's formulas with a fixed
dropout mask, and PEFT's own Conv2d / Embedding layers in torch on equal weights.
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import linen as dlinen
from dora_jax import nnx as dn

RNG = np.random.default_rng(0)
RATE = 0.4
CONV = dict(strides=(2, 1), padding=((1, 1), (0, 2)), kernel_dilation=(1, 2))


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def lax_conv(x, k, strides, padding, dilation):
  return np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), strides, padding,
      rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST), np.float64)


def ref_conv(x, w0, bias, a, b, s, m=None, mask=None):
  """PEFT's _ConvNd LoRA / _DoraConvNdLayer forward (training mode) from lax convolutions."""
  conv = lambda t, k: lax_conv(t, k, CONV["strides"], CONV["padding"], CONV["kernel_dilation"])
  ks = w0.shape[:-1]
  result = conv(x, w0) + bias
  xd = x if mask is None else x * mask / (1.0 - RATE)
  lora = conv(xd, a.reshape(*ks, -1)) @ np.asarray(b, np.float64)
  if m is None:
    return result + s * lora
  weight = np.asarray(w0, np.float64).reshape(-1, w0.shape[-1]) + s * np.asarray(a, np.float64) @ b
  g = np.asarray(m, np.float64) / np.sqrt((weight ** 2).sum(0))  # over every axis but O
  base = result - bias if mask is None else conv(xd, w0)
  return result + (g - 1) * base + g * s * lora


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(5, (3, 2), name="conv", **CONV)(x)


def _conv_setup(use_dora, rate=RATE):
  model, x = ConvNet(), jnp.asarray(rand(2, 6, 5, 3))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda t: t + 0.1 * jnp.asarray(rand(*t.shape)), params)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["conv"], use_dora=use_dora,
                            init_lora_weights=False, lora_dropout=rate)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg,
                              layouts=dora_jax.kernel_layouts(model, x))
  if use_dora:  # g != 1
    ad["conv"]["magnitude"] = ad["conv"]["magnitude"] * jnp.linspace(0.7, 1.3, 5)
  return model, x, params, cfg, ad


@pytest.mark.parametrize("use_dora", [True, False])
def test_linen_conv_matches_lax_reference_with_fixed_mask(use_dora, monkeypatch):
  model, x, params, cfg, ad = _conv_setup(use_dora)
  c, conv = ad["conv"], params["conv"]
  args = (np.asarray(x), np.asarray(conv["kernel"]), np.asarray(conv["bias"], np.float64),
          np.asarray(c["lora_a"]), np.asarray(c["lora_b"]), cfg.scale, c.get("magnitude"))
  f = dora_jax.wrap(model.apply, cfg)
  np.testing.assert_allclose(f(params, ad, x), ref_conv(*args), rtol=1e-5, atol=1e-5)
  mask = (RNG.random(x.shape) > RATE).astype(np.float32)
  monkeypatch.setattr(dlinen, "_dropout", lambda v, rate, rng: v * mask / (1.0 - rate))
  got = f(params, ad, x, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(got, ref_conv(*args, mask=mask), rtol=1e-5, atol=1e-5)


def test_linen_conv_dropout_is_random_and_gradients_match_merged():
  model, x, params, cfg, ad = _conv_setup(True)
  f = dora_jax.wrap(model.apply, cfg)
  y1 = f(params, ad, x, rngs={"dropout": jax.random.key(1)})
  y2 = f(params, ad, x, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(y1, y2)
  loss = lambda a: jnp.sum(jnp.sin(f(params, a, x)))
  merged = lambda a: jnp.sum(jnp.sin(model.apply({"params": dora_jax.merge(params, a, cfg)}, x)))
  for got, want in zip(jax.tree.leaves(jax.grad(loss)(ad)), jax.tree.leaves(jax.grad(merged)(ad))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _peft_layer(torch, peft_cls, base, cfg_kwargs):
  from peft import LoraConfig

  class Host(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.layer = base

  from peft import get_peft_model
  return get_peft_model(Host(), LoraConfig(target_modules=["layer"], **cfg_kwargs)).base_model.model.layer


class _FixedDropout:
  def __init__(self, torch, mask):
    self.torch, self.mask = torch, mask

  def module(self):
    mask = self.mask

    class M(self.torch.nn.Module):
      def forward(self, t):
        return t * mask / (1.0 - RATE) if self.training else t
    return M()


@pytest.mark.parametrize("use_dora", [True, False])
def test_linen_conv_matches_peft_conv2d(use_dora):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  model, x, params, cfg, ad = _conv_setup(use_dora)
  CONVP = dict(strides=(2, 1), padding=((1, 1), (0, 0)), kernel_dilation=(1, 1))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(5, (3, 2), name="conv", **CONVP)(x)

  model = Net()
  k, c = params["conv"], ad["conv"]
  base = torch.nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0))
  layer = _peft_layer(torch, None, base, dict(r=2, lora_alpha=3.0, use_dora=use_dora,
                                                lora_dropout=RATE))
  t = lambda a: torch.tensor(np.asarray(a))
  with torch.no_grad():
    layer.base_layer.weight.copy_(t(k["kernel"]).permute(3, 2, 0, 1))
    layer.base_layer.bias.copy_(t(k["bias"]))
    layer.lora_A["default"].weight.copy_(t(c["lora_a"]).reshape(3, 2, 3, 2).permute(3, 2, 0, 1))
    layer.lora_B["default"].weight.copy_(t(c["lora_b"]).T[:, :, None, None])
    if use_dora:
      mag = layer.lora_magnitude_vector["default"].weight
      mag.copy_(t(c["magnitude"]).reshape(mag.shape))
  mask = (RNG.random(x.shape) > RATE).astype(np.float32)
  layer.lora_dropout["default"] = _FixedDropout(torch, t(mask).permute(0, 3, 1, 2)).module()
  xt = t(x).permute(0, 3, 1, 2)
  monkey = dlinen._dropout
  try:
    dlinen._dropout = lambda v, rate, rng: v * mask / (1.0 - rate)
    layer.train()
    want = layer(xt).detach().permute(0, 2, 3, 1).numpy()
    got = dora_jax.wrap(model.apply, cfg)(params, ad, x, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    layer.eval()
    want = layer(xt).detach().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(dora_jax.wrap(model.apply, cfg)(params, ad, x), want, rtol=1e-5, atol=1e-5)
  finally:
    dlinen._dropout = monkey


class EmbedNet(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Embed(11, 4, name="embed")(ids)


@pytest.mark.parametrize("use_dora", [True, False])
def test_linen_embed_factored_matches_numpy_and_peft(use_dora, caplog):
  model, ids = EmbedNet(), jnp.asarray(RNG.integers(0, 11, (2, 5)))
  params = model.init(jax.random.key(0), ids)["params"]
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["embed"], use_dora=use_dora,
                            init_lora_weights=False, lora_dropout=RATE)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  e, c = np.asarray(params["embed"]["embedding"], np.float64), ad["embed"]
  a, b = np.asarray(c["lora_a"], np.float64), np.asarray(c["lora_b"], np.float64)
  i = np.asarray(ids)
  want = e[i] + cfg.scale * a[i] @ b
  if use_dora:
    g = np.asarray(c["magnitude"]) / np.linalg.norm(e + cfg.scale * a @ b, axis=0)
    want = g * want
  dlinen._said_merged.clear()
  with caplog.at_level(logging.WARNING, logger="dora_jax"):
    got = dora_jax.wrap(model.apply, cfg)(params, ad, ids, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # no dropout on ids (PEFT)
  assert "not applied to nn.Embed lookups" in caplog.text and "merged weight" not in caplog.text
  if use_dora:
    return  # PEFT's Embedding DoRA norms the transposed weight; our magnitude is per feature
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  layer = _peft_layer(torch, None, torch.nn.Embedding(11, 4),
                      dict(r=2, lora_alpha=3.0, lora_dropout=RATE))
  with torch.no_grad():
    layer.base_layer.weight.copy_(torch.tensor(e))
    layer.lora_embedding_A["default"].copy_(torch.tensor(a.T))
    layer.lora_embedding_B["default"].copy_(torch.tensor(b.T))
  layer.train()
  np.testing.assert_allclose(got, layer(torch.tensor(i)).detach().numpy(), rtol=1e-5, atol=1e-5)


class TConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.ConvTranspose(4, (3,), name="up")(x)


def test_merged_fallback_says_dropout_is_not_applied(caplog):
  model, x = TConv(), jnp.asarray(rand(2, 5, 3))
  params = model.init(jax.random.key(0), x)["params"]
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up"], lora_dropout=0.5, init_lora_weights=False)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg,
                              layouts=dora_jax.kernel_layouts(model, x))
  dlinen._said_merged.clear()
  with caplog.at_level(logging.WARNING, logger="dora_jax"):
    y = dora_jax.wrap(model.apply, cfg)(params, ad, x, rngs={"dropout": jax.random.key(0)})
  assert "lora_dropout=0.5 is NOT applied to ConvTranspose" in caplog.text
  np.testing.assert_allclose(y, model.apply({"params": dora_jax.merge(params, ad, cfg)}, x),
                             rtol=1e-5, atol=1e-5)


class ModeNet(nn.Module):
  """A Linen model with Flax's own `deterministic` convention."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    h = nn.Dropout(self.rate)(nn.Dense(6, name="up")(x), deterministic=deterministic)
    return nn.Dense(3, name="down")(h)


def test_linen_adapter_dropout_follows_model_mode():
  model, x = ModeNet(), jnp.asarray(rand(5, 4))
  params = model.init(jax.random.key(0), x)["params"]
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up", "down"], use_dora=True,
                            init_lora_weights=False, lora_dropout=0.5)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  f = dora_jax.wrap(model.apply, cfg)
  det = f(params, ad, x)
  r1, r2 = {"dropout": jax.random.key(1)}, {"dropout": jax.random.key(2)}
  # The model's deterministic=True switches the adapter dropout off, rng or not.
  np.testing.assert_array_equal(f(params, ad, x, rngs=r1, deterministic=True), det)
  np.testing.assert_array_equal(
      f(params, ad, x, rngs=r1, deterministic=False, adapter_dropout=False), det)
  assert not np.allclose(f(params, ad, x, rngs=r1, deterministic=False),
                         f(params, ad, x, rngs=r2, deterministic=False))
  assert not np.allclose(f(params, ad, x, rngs=r1, adapter_dropout=True), det)
  with pytest.raises(ValueError, match="adapter_dropout=True needs a dropout key"):
    f(params, ad, x, adapter_dropout=True)
