"""PEFT's rank_pattern / alpha_pattern: per-module rank and scale, Linen and NNX, vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import nnx as dn
from test_core import MLP, rand


def _cfg(use_dora, **kw):
  return dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["up", "down"], use_dora=use_dora,
                             init_lora_weights=False, rank_pattern={"up": 4},
                             alpha_pattern={r"d.wn": 5.0}, **kw)


def np_layer(x, w, bias, a, b, s, m):
  w_prime = np.asarray(w, np.float64) + s * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  if m is not None:
    w_prime = w_prime * np.asarray(m) / np.linalg.norm(w_prime, axis=0)
  return x @ w_prime + (0.0 if bias is None else np.asarray(bias))


@pytest.mark.parametrize("use_dora", [True, False])
def test_rank_and_alpha_pattern_linen(use_dora):
  cfg = _cfg(use_dora)
  assert cfg.for_module("model/up").r == 4 and cfg.for_module("model/up").scale == 3.0 / 4
  assert cfg.for_module("down").r == 2 and cfg.for_module("down").scale == 5.0 / 2
  assert cfg.for_module("other/updown").r == 2  # full-name match, not substring
  model, x = MLP(), jnp.asarray(rand(7, 4))
  params = model.init(jax.random.key(0), x)["params"]
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  assert ad["up"]["lora_a"].shape == (4, 4) and ad["down"]["lora_a"].shape == (6, 2)
  up, dn_ = params["up"], params["down"]
  h = np_layer(np.asarray(x), up["kernel"], up["bias"], ad["up"]["lora_a"], ad["up"]["lora_b"],
               3.0 / 4, ad["up"].get("magnitude"))
  want = np_layer(np.tanh(h), dn_["kernel"], None, ad["down"]["lora_a"], ad["down"]["lora_b"],
                  5.0 / 2, ad["down"].get("magnitude"))
  np.testing.assert_allclose(dora_jax.wrap(model.apply, cfg)(params, ad, x), want, rtol=1e-5, atol=1e-5)
  merged, norms = dora_jax.merge(params, ad, cfg, return_norms=True)
  np.testing.assert_allclose(model.apply({"params": merged}, x), want, rtol=1e-5, atol=1e-5)
  back = dora_jax.unmerge(merged, ad, cfg, norms)
  np.testing.assert_allclose(back["up"]["kernel"], params["up"]["kernel"], atol=1e-5)
  assert dora_jax.LoraConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.to_dict()["rank_pattern"] == {"up": 4}
  hash(cfg)


class Net(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(4, 6, rngs=rngs)
    self.down = nnx.Linear(6, 5, rngs=rngs)

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


def test_rank_and_alpha_pattern_nnx():
  cfg = _cfg(True)
  model = Net(nnx.Rngs(0))
  x = jnp.asarray(rand(7, 4))
  p = dn.param_dict(model)
  dn.apply_adapters(model, cfg, nnx.Rngs(1))
  ad = dn.adapter_dict(model)
  assert ad["up"]["lora_a"].shape == (4, 4)
  h = np_layer(np.asarray(x), p["up"]["kernel"], p["up"]["bias"], ad["up"]["lora_a"],
               ad["up"]["lora_b"], 3.0 / 4, ad["up"]["magnitude"])
  want = np_layer(np.tanh(h), p["down"]["kernel"], p["down"]["bias"], ad["down"]["lora_a"],
                  ad["down"]["lora_b"], 5.0 / 2, ad["down"]["magnitude"])
  np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)


def test_bad_patterns():
  with pytest.raises(ValueError, match=r"rank_pattern\['up'\] must be a positive integer"):
    dora_jax.LoraConfig(target_modules=["up"], rank_pattern={"up": 0})
  with pytest.raises(ValueError, match="alpha_pattern key '\\(' is not a valid regex"):
    dora_jax.LoraConfig(target_modules=["up"], alpha_pattern={"(": 1.0})
  with pytest.raises(ValueError, match="r=9 is larger than the module 'up'"):
    model, x = MLP(), jnp.ones((1, 4))
    params = model.init(jax.random.key(0), x)["params"]
    dora_jax.init_adapters(jax.random.key(1), params,
                           dora_jax.LoraConfig(target_modules=["up"], rank_pattern={"up": 9}))
