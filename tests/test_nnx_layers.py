"""NNX wrapping of nnx.Conv / nnx.Embed (PEFT's Conv / Embedding forms, as Linen) and the
adapters' train/eval mode following the host model."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import nnx as dn
from test_conv_embed import CONV, RATE, ref_conv

RNG = np.random.default_rng(1)


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


class FixedDropout(nnx.Module):
  """Stands in for the adapter's nnx.Dropout with a known mask."""

  def __init__(self, mask, rate):
    self.mask, self.rate, self.deterministic = nnx.data(mask), rate, False

  def __call__(self, x):
    return x * self.mask / (1.0 - self.rate)


class ConvModel(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 5, (3, 2), rngs=rngs, **CONV)


@pytest.mark.parametrize("use_dora", [True, False])
def test_nnx_conv_matches_lax_reference_and_linen(use_dora):
  model = ConvModel(nnx.Rngs(0))
  x = jnp.asarray(rand(2, 6, 5, 3))
  model.conv.bias[...] = jnp.asarray(rand(5))
  w0, bias = np.asarray(model.conv.kernel[...]), np.asarray(model.conv.bias[...], np.float64)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["conv"], use_dora=use_dora,
                            init_lora_weights=False, lora_dropout=RATE)
  dn.apply_adapters(model, cfg, nnx.Rngs(params=1, dropout=2), deterministic=True)
  w = model.conv
  if use_dora:
    w.magnitude[...] = w.magnitude[...] * jnp.linspace(0.7, 1.3, 5)
  ad = w.adapter()
  args = (np.asarray(x), w0, bias, np.asarray(ad["lora_a"]), np.asarray(ad["lora_b"]),
          cfg.scale, ad.get("magnitude"))
  np.testing.assert_allclose(w(x), ref_conv(*args), rtol=1e-5, atol=1e-5)
  # The Linen front-end on the same weights and adapters: the same function.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, t):
      return nn.Conv(5, (3, 2), name="conv", **CONV)(t)

  params = {"conv": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(bias, jnp.float32)}}
  got_linen = dora_jax.wrap(Net().apply, cfg)(params, {"conv": ad}, x)
  np.testing.assert_allclose(w(x), got_linen, rtol=1e-6, atol=1e-6)
  # Dropout on the conv input, PEFT's form.
  mask = (RNG.random(x.shape) > RATE).astype(np.float32)
  w.lora_dropout = FixedDropout(jnp.asarray(mask), RATE)
  np.testing.assert_allclose(w(x), ref_conv(*args, mask=mask), rtol=1e-5, atol=1e-5)
  # Merge back to a plain nnx.Conv with W'.
  w.lora_dropout = nnx.data(None)
  y = w(x)
  dn.merge_adapters(model)
  assert type(model.conv) is nnx.Conv
  np.testing.assert_allclose(model.conv(x), y, rtol=1e-5, atol=1e-5)


class EmbedModel(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 4, rngs=rngs)


@pytest.mark.parametrize("use_dora", [True, False])
def test_nnx_embed_lookup_attend_and_merge(use_dora, caplog):
  model = EmbedModel(nnx.Rngs(0))
  ids = jnp.asarray(RNG.integers(0, 11, (2, 5)))
  e = np.asarray(model.embed.embedding[...], np.float64)
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["embed"], use_dora=use_dora,
                            init_lora_weights=False, lora_dropout=RATE)
  dn.apply_adapters(model, cfg, nnx.Rngs(params=1, dropout=2))
  ad = model.embed.adapter()
  a, b = np.asarray(ad["lora_a"], np.float64), np.asarray(ad["lora_b"], np.float64)
  w_prime = e + cfg.scale * a @ b
  if use_dora:
    w_prime = w_prime * np.asarray(ad["magnitude"]) / np.linalg.norm(w_prime, axis=0)
  dn._said.clear()
  with caplog.at_level(logging.WARNING, logger="dora_jax"):
    y = model.embed(ids)  # dropout active (train mode) but never on ids
  assert "not applied to nnx.Embed lookups" in caplog.text
  np.testing.assert_allclose(y, w_prime[np.asarray(ids)], rtol=1e-5, atol=1e-5)
  q = rand(3, 4)
  np.testing.assert_allclose(model.embed.attend(jnp.asarray(q)), q @ w_prime.T, rtol=1e-5, atol=1e-5)
  dn.merge_adapters(model)
  assert type(model.embed) is nnx.Embed
  np.testing.assert_allclose(model.embed.embedding[...], w_prime, rtol=1e-5, atol=1e-6)


class WithDropout(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(4, 6, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.down = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.down(self.drop(jnp.tanh(self.up(x))))


def test_adapter_dropout_follows_model_mode():
  cfg = dora_jax.LoraConfig(r=2, target_modules=["up", "down"], use_dora=True,
                            init_lora_weights=False, lora_dropout=0.5)
  x = jnp.asarray(rand(5, 4))
  model = WithDropout(nnx.Rngs(0))
  model.eval()
  assert dn.model_deterministic(model) is True
  dn.apply_adapters(model, cfg, nnx.Rngs(params=1, dropout=2))
  assert model.up.lora_dropout.deterministic
  np.testing.assert_array_equal(model(x), model(x))
  model.train()
  assert not model.up.lora_dropout.deterministic
  assert not np.allclose(model(x), model(x))
  model.eval()
  np.testing.assert_array_equal(model(x), model(x))
  # A model in train mode, or one whose mode leaves no trace, gets active dropouts (NNX default).
  train_model = WithDropout(nnx.Rngs(0))
  dn.apply_adapters(train_model, cfg, nnx.Rngs(params=1, dropout=2))
  assert not train_model.up.lora_dropout.deterministic
  plain = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  assert dn.model_deterministic(plain) is None
  wrapped = dn.apply_adapters(plain, dataclasses_replace(cfg, target_modules=".*"),
                              nnx.Rngs(params=1, dropout=2), deterministic=True)
  np.testing.assert_array_equal(wrapped(x), wrapped(x))


def dataclasses_replace(cfg, **kw):
  import dataclasses
  return dataclasses.replace(cfg, **kw)
