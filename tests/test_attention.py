"""The XLA attention path of :func:`dora_jax.models.attention.dot_product_attention` (its
written backward) against a float64 numpy forward and autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.models.attention import attention_mask, cache_mask, dot_product_attention

B, T, H, K, D = 2, 12, 6, 2, 8


def _inputs(s=T, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in
             ((B, T, H, D), (B, s, K, D), (B, s, K, D)))
  d_out = rng.standard_normal((B, T, H, D)).astype(np.float32)
  return [jnp.asarray(t, dtype) for t in (q, k, v)], jnp.asarray(d_out)


def _numpy_attention(q, k, v, mask):
  """float64 ``softmax(q kᵀ/√d + mask) v``, KV head ``h // (H/K)`` for query head ``h``."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
  scores = np.where(np.asarray(mask), scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _plain_attention(q, k, v, mask):
  """The formula in jnp, differentiated by autodiff (the gradient reference)."""
  k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
  p = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p, v)


MASKS = {
    "causal": lambda: None,
    "padding_and_window": lambda: attention_mask(T, jnp.ones((B, T), jnp.int32).at[0, :4].set(0), None, 5),
    "segments": lambda: attention_mask(T, None, jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat(4, 1))),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_xla_attention_forward_and_gradients(name):
  mask = MASKS[name]()
  (q, k, v), d_out = _inputs()
  full = jnp.tril(jnp.ones((T, T), bool))[None, None] if mask is None else mask
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask), _numpy_attention(q, k, v, full),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a, mask) * d_out), (0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: jnp.sum(_plain_attention(*a, full) * d_out), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5)


def test_xla_attention_over_a_longer_kv_cache():
  """``T`` queries over ``S > T`` cache slots (generation), the last two slots padding."""
  s = T + 4
  (q, k, v), _ = _inputs(s)
  mask = cache_mask(jnp.int32(2), T, jnp.ones((B, s), jnp.int32).at[:, -2:].set(0))
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask), _numpy_attention(q, k, v, mask),
                             rtol=1e-5, atol=1e-5)


def test_xla_attention_bfloat16_keeps_the_dtype_and_matches_float32():
  (q, k, v), d_out = _inputs(dtype=jnp.bfloat16)
  out = dot_product_attention(q, k, v, None)
  grads = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a, None).astype(jnp.float32) * d_out),
                   (0, 1, 2))(q, k, v)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  f32 = [t.astype(jnp.float32) for t in (q, k, v)]
  want = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a, None) * d_out), (0, 1, 2))(*f32)
  np.testing.assert_allclose(np.asarray(out, np.float32), dot_product_attention(*f32, None), atol=3e-2)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=5e-2, atol=5e-2)
