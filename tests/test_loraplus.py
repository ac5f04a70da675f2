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


@jax.jit
def _adam_tree(lr, p, g):
  """Plain Adam's first update of a whole tree (lr traced: one compile)."""
  tx = optax.adam(lr)
  return tx.update(g, tx.init(p), p)[0]


def test_one_adam_step_moves_b_ratio_times():
  adapters, grads = _tree()
  lr, ratio, lr_emb = 1e-3, 16.0, 1e-6
  tx = dora_jax.loraplus(optax.adam, lr, loraplus_lr_ratio=ratio, loraplus_lr_embedding=lr_emb,
                         embedding_modules=["embed_tokens"])
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, adapters)
  plain, fast, emb = (_adam_tree(v, adapters, grads) for v in (lr, lr * ratio, lr_emb))
  u, q_plain, q_fast = updates["layers"]["q"], plain["layers"]["q"], fast["layers"]["q"]
  np.testing.assert_allclose(u["lora_a"], q_plain["lora_a"], rtol=1e-6)
  np.testing.assert_allclose(u["lora_b"], q_fast["lora_b"], rtol=1e-6)
  # B moves ratio x as far as under plain Adam at the same lr.
  np.testing.assert_allclose(u["lora_b"], ratio * q_plain["lora_b"], rtol=1e-5)
  assert not np.allclose(u["lora_b"], q_plain["lora_b"])
  # PEFT puts 1-D params (DoRA's magnitude) in group B.
  np.testing.assert_allclose(u["magnitude"], q_fast["magnitude"], rtol=1e-6)
  for name in ("lora_a", "lora_b"):
    np.testing.assert_allclose(updates["embed_tokens"][name], emb["embed_tokens"][name], rtol=1e-6)


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
