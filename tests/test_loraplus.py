"""LoRA+ (PEFT's create_loraplus_optimizer) as an optax partition: one Adam step vs plain Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax


def _tree():
  k = jax.random.split(jax.random.key(0), 6)
  adapters = {
      "layers": {"q": {"lora_a": jax.random.normal(k[0], (2, 4, 2)),  # nn.scan-stacked
                       "lora_b": jax.random.normal(k[1], (2, 2, 3)),
                       "magnitude": jax.random.normal(k[2], (2, 3))}},
      "embed_tokens": {"lora_a": jax.random.normal(k[3], (5, 2)),
                       "lora_b": jax.random.normal(k[4], (2, 3))},
  }
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.1, adapters)
  return adapters, grads


def _adam_step(lr, p, g):
  tx = optax.adam(lr)
  u, _ = tx.update(g, tx.init(p), p)
  return u


def test_one_adam_step_moves_b_ratio_times():
  adapters, grads = _tree()
  lr, ratio, lr_emb = 1e-3, 16.0, 1e-6
  tx = dora_jax.loraplus(optax.adam, lr, loraplus_lr_ratio=ratio, loraplus_lr_embedding=lr_emb,
                         embedding_modules=["embed_tokens"])
  updates, _ = tx.update(grads, tx.init(adapters), adapters)
  q, gq = adapters["layers"]["q"], grads["layers"]["q"]
  u = updates["layers"]["q"]
  np.testing.assert_allclose(u["lora_a"], _adam_step(lr, q["lora_a"], gq["lora_a"]), rtol=1e-6)
  np.testing.assert_allclose(u["lora_b"], _adam_step(lr * ratio, q["lora_b"], gq["lora_b"]),
                             rtol=1e-6)
  # B moves ratio x as far as under plain Adam at the same lr.
  np.testing.assert_allclose(u["lora_b"], ratio * _adam_step(lr, q["lora_b"], gq["lora_b"]),
                             rtol=1e-5)
  # PEFT puts 1-D params (DoRA's magnitude) in group B.
  np.testing.assert_allclose(u["magnitude"], _adam_step(lr * ratio, q["magnitude"], gq["magnitude"]),
                             rtol=1e-6)
  for name in ("lora_a", "lora_b"):
    np.testing.assert_allclose(
        updates["embed_tokens"][name],
        _adam_step(lr_emb, adapters["embed_tokens"][name], grads["embed_tokens"][name]), rtol=1e-6)


def test_schedule_is_scaled_and_frozen_leaves_stay():
  sched = optax.linear_schedule(1e-3, 0.0, 10)
  tx = dora_jax.loraplus(optax.sgd, sched, loraplus_lr_ratio=4.0)
  params = {"w": jnp.ones(3), "lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3))}
  grads = jax.tree.map(jnp.ones_like, params)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(u["w"], 0.0)
  np.testing.assert_allclose(u["lora_a"], -1e-3, rtol=1e-6)
  np.testing.assert_allclose(u["lora_b"], -4e-3, rtol=1e-6)


def test_labels_and_bad_ratio():
  adapters, _ = _tree()
  labels = dora_jax.loraplus_labels(adapters, "embed_.*")
  assert labels["layers"]["q"] == {"lora_a": "loraplus_a", "lora_b": "loraplus_b",
                                   "magnitude": "loraplus_b"}
  assert set(labels["embed_tokens"].values()) == {"loraplus_embedding"}
  with pytest.raises(ValueError, match="loraplus_lr_ratio"):
    dora_jax.loraplus(optax.adam, 1e-3, loraplus_lr_ratio=0)
