"""Attention pieces shared by the decoders in :mod:`dora_jax.models.llama`.

RoPE (Hugging Face's rotate-half form), the boolean masks (causal, padding, packed
segments, sliding window), the attention product (with Gemma 2's logit soft-capping)
and the fixed-size KV cache that generation writes through the ``"cache"`` collection.

Masks are boolean, ``True`` = may attend, shaped ``[B|1, 1, T, S]`` (queries ``T``,
keys ``S``). A sliding window of ``W`` lets query slot ``i`` see key slots ``j`` with
``i - W < j <= i`` (transformers' ``sliding_window_overlay``: ``kv_idx > q_idx - W``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def rope_frequencies(config: Any, local: bool = False) -> Array:
  """Inverse frequencies ``[head_dim // 2]`` (float32), with linear / llama3 scaling.

  ``local=True``: Gemma 3's sliding-window layers, plain RoPE with base
  ``config.rope_local_base_freq`` (transformers' ``rope_parameters["sliding_attention"]``).

  Raises:
    ValueError: an unsupported ``rope_scaling`` type.
  """
  hd = config.head_dim
  base = config.rope_local_base_freq if local else config.rope_theta
  inv = 1.0 / (base ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  sc = None if local else config.rope_scaling
  if not sc:
    return inv
  kind = sc.get("rope_type", sc.get("type"))
  if kind == "linear":
    return inv / sc["factor"]
  if kind == "llama3":
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old / low, old / high
    smooth = (old / wavelen - low) / (high - low)
    scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    return jnp.where(is_mid, mid, scaled)
  raise ValueError(f"Unsupported rope_scaling type {kind!r}; supported: linear, llama3.")


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """HF's rotate-half RoPE. ``x: [B, T, H, hd]``, ``positions: [B, T]``."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(t: int, attention_mask: Array | None, segment_ids: Array | None,
                   sliding_window: int | None = None) -> Array | None:
  """Boolean ``[B|1, 1, T, T]`` mask: causal, within a segment, not to padding, within
  ``sliding_window``; ``None`` when there is none of these (then attention is just causal)."""
  if attention_mask is None and segment_ids is None and sliding_window is None:
    return None
  i = jnp.arange(t)
  mask = (i[None, :] <= i[:, None])[None, None]
  if sliding_window is not None:
    mask = mask & (i[:, None] - i[None, :] < sliding_window)[None, None]
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = mask & same
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, None, :]
  if segment_ids is not None or attention_mask is not None:
    # A padded query row attending to nothing would give NaN: let it see itself.
    mask = mask | jnp.eye(t, dtype=bool)[None, None]
  return mask


def cache_mask(cache_index: Array, t: int, kv_mask: Array, sliding_window: int | None = None) -> Array:
  """Mask ``[B, 1, T, S]`` of ``T`` queries written at cache slots ``cache_index + [0, T)``
  over the ``S`` slots of a KV cache.

  Args:
    cache_index: int32 scalar, the slot of the first query.
    t: number of queries.
    kv_mask: ``[B, S]``, 1 where a slot holds (or will hold) a real token, 0 for padding.
    sliding_window: the window ``W``, or None.
  """
  s = kv_mask.shape[-1]
  q = cache_index + jnp.arange(t)[:, None]  # [T, 1]
  k = jnp.arange(s)[None, :]  # [1, S]
  allowed = k <= q
  if sliding_window is not None:
    allowed = allowed & (q - k < sliding_window)
  mask = allowed[None, None] & kv_mask.astype(bool)[:, None, None, :]
  return mask | (k == q)[None, None]  # a padding query sees itself (no NaN)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *,
                          scale: float | None = None, softcap: float | None = None,
                          implementation: str | None = None) -> Array:
  """``softmax(softcap(q kᵀ · scale) + mask) v`` with grouped KV heads.

  Args:
    q: ``[B, T, H, hd]``. k, v: ``[B, S, K, hd]`` with ``H`` a multiple of ``K``.
    mask: boolean ``[B|1, 1, T, S]``, or None for plain causal attention (``T == S``).
    scale: the score scale (default ``hd ** -0.5``).
    softcap: Gemma 2's ``attn_logit_softcapping``: scores become ``c·tanh(scores / c)``
      before the mask (transformers' ``eager_attention_forward``).
    implementation: ``None`` / ``"xla"``: einsums in XLA, with the backward of
      :func:`_attention_head_major` (without soft-capping); another value (``"cudnn"``) is
      passed to ``jax.nn.dot_product_attention`` (without soft-capping only).

  Returns:
    ``[B, T, H, hd]`` in ``q``'s dtype; the softmax is float32.
  """
  if softcap is None and implementation not in (None, "xla"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, scale=scale,
                                        implementation=implementation)
  b, t, h, hd = q.shape
  s, kh = k.shape[1], k.shape[2]
  if mask is None:
    mask = jnp.tril(jnp.ones((t, s), bool))[None, None]
  scale = hd ** -0.5 if scale is None else scale
  if softcap is None:
    qh = q.reshape(b, t, kh, h // kh, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]
    out = _attention_head_major(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                mask[:, :, None], scale)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
  qg = q.reshape(b, t, kh, h // kh, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_head_major(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """``softmax(q kᵀ · scale + mask) v`` per KV head: ``q [B, K, G, T, hd]``, ``k, v
  [B, K, S, hd]``, ``mask`` boolean ``[B|1, 1, 1, T, S]`` -> ``[B, K, G, T, hd]``.

  The backward is the softmax-attention gradient written so that no product reads the
  ``[T, S]`` probabilities or their cotangent transposed: ``∇k`` and ``∇v`` are computed
  as ``(qᵀ ∇s)ᵀ`` and ``(∇oᵀ p)ᵀ``, transposing ``[hd, S]`` results instead. Autodiff of
  ``jax.nn.dot_product_attention``'s XLA path copied the ``[B, H, T, S]`` matrices
  transposed for those two products (XLA:CPU), ~5 % of a SmolLM2-shaped LoRA step.
  """
  return _attention_head_major_fwd(q, k, v, mask, scale)[0]


def _attention_head_major_fwd(q, k, v, mask, scale):
  scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype), (q, k, v, probs)


def _attention_head_major_bwd(scale, residuals, d_out):
  q, k, v, probs = residuals
  d_out = d_out.astype(q.dtype)
  d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out, v, preferred_element_type=jnp.float32)
  d_v = jnp.einsum("bkgtd,bkgts->bkds", d_out, probs, preferred_element_type=jnp.float32)
  p32 = probs.astype(jnp.float32)
  d_scores = (p32 * (d_probs - jnp.sum(d_probs * p32, axis=-1, keepdims=True)) * scale).astype(q.dtype)
  d_q = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("bkgtd,bkgts->bkds", q, d_scores, preferred_element_type=jnp.float32)
  # The barrier keeps XLA from folding the [hd, S] -> [S, hd] transposes back into the products.
  d_k, d_v = jax.lax.optimization_barrier((d_k, d_v))
  return (d_q.astype(q.dtype), jnp.swapaxes(d_k, -1, -2).astype(k.dtype),
          jnp.swapaxes(d_v, -1, -2).astype(v.dtype), None)


_attention_head_major.defvjp(_attention_head_major_fwd, _attention_head_major_bwd)


def update_kv_cache(module: nn.Module, k: Array, v: Array, cache_index: Array,
                    slots: int) -> tuple[Array, Array]:
  """Writes ``k, v [B, T, K, hd]`` into the module's ``cache`` collection at slots
  ``cache_index + [0, T)`` and returns the whole cache ``[B, S, K, hd]`` (keys, values).

  The cache variables ``cached_key`` / ``cached_value`` are created by ``model.init`` with
  the shape of that call's input (see :func:`dora_jax.models.generation.init_cache`).

  Raises:
    ValueError: the cache is missing at apply time (pass ``{"cache": ...}`` and
      ``mutable=["cache"]``), or its length is not ``slots`` (the attention mask's last axis).
  """
  if not module.is_initializing() and not module.has_variable("cache", "cached_key"):
    raise ValueError(
        f"'{'/'.join(module.scope.path)}' runs with cache_index but has no KV cache: pass "
        "variables {'params': ..., 'cache': init_cache(model, batch, max_length)} and mutable=['cache'].")
  ck = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
  cv = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
  if ck.value.shape[1] != slots:
    raise ValueError(f"The KV cache holds {ck.value.shape[1]} slots but the attention mask covers {slots}:"
                     " with cache_index, attention_mask is [B, S] over every cache slot.")
  if ck.value.shape[0] != k.shape[0]:
    raise ValueError(f"The KV cache is for batch {ck.value.shape[0]}, the input has {k.shape[0]} rows.")
  start = (0, cache_index, 0, 0)
  ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), start)
  cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), start)
  return ck.value, cv.value
