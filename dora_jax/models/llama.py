"""A Flax Linen decoder for the Llama family and its relatives.

One module, :class:`Llama`, runs Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3,
Gemma 2 and Gemma 3 (text); :class:`LlamaConfig` (Hugging Face field names) says
which parts each family has:

=================  ===========================================================
qwen2              q/k/v biases
qwen3              RMSNorm over each head of q and k (``q_norm``, ``k_norm``)
mistral            a sliding window on every layer (``sliding_window``)
gemma2             RMSNorm ``x·(1 + w)``; embeddings scaled by ``sqrt(hidden)``;
                   norms before and after attention and MLP; GeGLU (tanh GELU);
                   scores scaled by ``query_pre_attn_scalar^-1/2``; attention and
                   final logit soft-capping; sliding window on alternate layers
gemma3_text        gemma2 without soft-capping, with (1 + w) q/k norms, a sliding
                   window on 5 of 6 layers and their own RoPE base
                   (``rope_local_base_freq``)
=================  ===========================================================

Parameter names mirror Hugging Face's module names, so adapters target them the
PEFT way (``q_proj``, ``v_proj``, ...)::

    {"model": {"embed_tokens": {"embedding": [V, D]},
               "layers_0": {...}, ...            # or "layers": {...} stacked [L, ...] with scan_layers
               "norm": {"scale": [D]}},
     "lm_head": {"kernel": [D, V]}}             # absent with tied embeddings
    layer = {"self_attn": {"q_proj", "k_proj", "v_proj", "o_proj", ["q_norm", "k_norm"]},
             "mlp": {"gate_proj", "up_proj", "down_proj"},
             "input_layernorm", "post_attention_layernorm",
             ["pre_feedforward_layernorm", "post_feedforward_layernorm"]}   # Gemma

Projections are ``nn.Dense`` with 2-D kernels ``[in, out]`` (the HF weight
transposed); norm scales are stored as HF stores them (Gemma's zero-centred ``w``).
Every parameter carries logical axis names (see :data:`LOGICAL_AXIS_RULES`) for
mesh sharding. With ``cache_index`` the model decodes against a KV cache held in the
``"cache"`` collection (see :mod:`dora_jax.models.generation`).

Formulas: transformers 5's ``modeling_llama.py``, ``modeling_qwen3.py``,
``modeling_gemma2.py``, ``modeling_gemma3.py``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dora_jax.models.attention import (
    apply_rope,
    attention_mask,
    cache_mask,
    dot_product_attention,
    rope_frequencies,
    update_kv_cache,
)
from dora_jax.models.configuration import ACTIVATIONS, SUPPORTED_MODEL_TYPES, LlamaConfig

Array = jax.Array

__all__ = ["LlamaConfig", "Llama", "LlamaModel", "LOGICAL_AXIS_RULES", "SUPPORTED_MODEL_TYPES",
           "attention_mask", "apply_rope", "rope_frequencies", "greedy_generate"]

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)
"""Logical axis → mesh axis: Megatron-style tensor parallelism over heads and
MLP, FSDP over the embedding axis, the batch over ``data`` and ``fsdp``."""

def _select(flag, a, b):
  """``a if flag else b`` for a Python bool, ``jnp.where`` for a traced one (a scanned layer's)."""
  if isinstance(flag, bool):
    return a if flag else b
  return jnp.where(flag, a, b)


class RMSNorm(nn.Module):
  """``x / rms(x) · w`` in float32; Gemma's ``offset``: ``x / rms(x) · (1 + w)``, ``w`` init 0."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  offset: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = scale.astype(jnp.float32)
    return (y * (1.0 + w if self.offset else w)).astype(self.dtype)


def _dense(features: int, axes: tuple[str, str], name: str, cfg: nn.Module, bias: bool = False) -> nn.Dense:
  return nn.Dense(
      features, use_bias=bias, name=name, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


class Attention(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, positions, masks, sliding, cache_index=None):
    """``masks = (full, sliding_window)`` (see :class:`LlamaModel`); ``sliding``: this layer's
    type (a Python bool, or a traced one under ``nn.scan``)."""
    c = self.config
    b, t, _ = x.shape
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q = _dense(nh * hd, ("embed", "heads"), "q_proj", self, c.attention_bias)(x).reshape(b, t, nh, hd)
    k = _dense(nkv * hd, ("embed", "kv_heads"), "k_proj", self, c.attention_bias)(x).reshape(b, t, nkv, hd)
    v = _dense(nkv * hd, ("embed", "kv_heads"), "v_proj", self, c.attention_bias)(x).reshape(b, t, nkv, hd)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, c.is_gemma, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, c.is_gemma, name="k_norm")(k)
    inv_freq = rope_frequencies(c)
    if c.rope_local_base_freq is not None and any(c.sliding_layers):
      inv_freq = _select(sliding, rope_frequencies(c, local=True), inv_freq)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
    mask = masks[0] if masks[1] is None else _select(sliding, masks[1], masks[0])
    if cache_index is not None:
      k, v = update_kv_cache(self, k, v, cache_index, mask.shape[-1])
    # mask None: plain causal attention (lets cuDNN skip the masked half).
    out = dot_product_attention(q, k, v, mask, scale=c.attention_scale, softcap=c.attn_logit_softcapping,
                                implementation=self.attention_impl)
    out = out.reshape(b, t, nh * hd)
    return _dense(c.hidden_size, ("heads", "embed"), "o_proj", self)(out)


class MLP(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = _dense(c.intermediate_size, ("embed", "mlp"), "gate_proj", self)(x)
    up = _dense(c.intermediate_size, ("embed", "mlp"), "up_proj", self)(x)
    h = swiglu(gate, up) if c.hidden_act == "silu" else ACTIVATIONS[c.hidden_act](gate) * up
    h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
    return _dense(c.hidden_size, ("mlp", "embed"), "down_proj", self)(h)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
  """``silu(gate) ⊙ up`` (Llama's gated MLP), elementwise, float32 inside, ``gate``'s dtype out.

  Its backward is one elementwise pass, ``∇gate = ∇h ⊙ up ⊙ σ(g) (1 + g (1 − σ(g)))``,
  ``∇up = ∇h ⊙ silu(g)``, where autodiff of ``jax.nn.silu(gate) * up`` ran three
  (the sigmoid's divide, two products) and kept the sigmoid: ~7 % of the op time of a
  SmolLM2-shaped training step on XLA:CPU. Residuals: ``gate`` and ``up``.
  """
  return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype), (gate, up)


def _swiglu_bwd(residuals, d_h):
  gate, up = residuals
  g, u, d = (t.astype(jnp.float32) for t in (gate, up, d_h))
  sig = jax.nn.sigmoid(g)
  d_gate = d * u * sig * (1.0 + g * (1.0 - sig))
  return d_gate.astype(gate.dtype), (d * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class DecoderLayer(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, positions, masks, sliding=False, cache_index=None):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, c.is_gemma, name=name)
    a = Attention(c, self.dtype, self.param_dtype, self.attention_impl, name="self_attn")(
        norm("input_layernorm")(x), positions, masks, sliding, cache_index)
    if c.is_gemma:  # Gemma: norm after attention and around the MLP
      h = x + norm("post_attention_layernorm")(a)
      m = MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("pre_feedforward_layernorm")(h))
      out = h + norm("post_feedforward_layernorm")(m)
    else:
      h = x + a
      out = h + MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(h))
    return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))


class _ScanLayer(DecoderLayer):
  @nn.compact
  def __call__(self, x, shared, sliding):
    positions, masks, cache_index = shared
    return super().__call__(x, positions, masks, sliding, cache_index), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _DecoderOptions(nn.Module):
  """The options :class:`Llama` passes on to its :class:`LlamaModel` (described on :class:`Llama`)."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str | None = None


class LlamaModel(_DecoderOptions):
  """The decoder stack (HF's ``model``): embeddings, layers, final norm."""

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
    policy = _REMAT_POLICIES.get(self.remat)
    if self.remat not in ("none", *_REMAT_POLICIES):
      raise ValueError(f"remat must be none, full or dots, got {self.remat!r}.")
    if self.scan_layers:
      layer = nn.remat(_ScanLayer, policy=policy, prevent_cse=False) if policy else _ScanLayer
      self.layers = nn.scan(
          layer, variable_axes={"params": 0, "cache": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, 0), length=c.num_hidden_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(**kw)
    else:
      layer = nn.remat(DecoderLayer, policy=policy) if policy else DecoderLayer
      self.layers_list = [layer(**kw, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, c.is_gemma)

  def _masks(self, t, attention_mask_, segment_ids, cache_index):
    """``(full, sliding)`` masks; ``sliding`` is None where no layer slides or the window
    covers every key (then it equals ``full``); ``full`` is None for plain causal."""
    c = self.config
    if cache_index is None:
      keys = t
      full = attention_mask(t, attention_mask_, segment_ids)
      make = lambda w: attention_mask(t, attention_mask_, segment_ids, w)
    else:
      if attention_mask_ is None:
        raise ValueError("With cache_index, attention_mask [B, S] over the cache slots is required.")
      if segment_ids is not None:
        raise ValueError("segment_ids (packing) cannot be combined with cache_index (decoding).")
      keys = attention_mask_.shape[-1]
      full = cache_mask(cache_index, t, attention_mask_)
      make = lambda w: cache_mask(cache_index, t, attention_mask_, w)
    window = c.sliding_window
    if window is None or window >= keys:
      return full, None
    sliding = make(window)
    if full is None:
      full = attention_mask(t, None, None, keys)  # explicit causal, to select from per layer
    return full, sliding

  def __call__(self, input_ids, attention_mask_=None, positions=None, segment_ids=None, cache_index=None):
    c = self.config
    b, t = input_ids.shape
    if positions is None:
      start = 0 if cache_index is None else cache_index
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    masks = self._masks(t, attention_mask_, segment_ids, cache_index)
    x = self.embed_tokens(input_ids)
    if c.is_gemma:  # HF: embedding * sqrt(hidden) cast to the embedding's dtype
      x = x * jnp.asarray(c.hidden_size ** 0.5, self.param_dtype).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    sliding = c.sliding_layers  # picks the window mask (when one is needed) and Gemma 3's RoPE base
    if self.scan_layers:
      x, _ = self.layers(x, (positions, masks, cache_index), jnp.asarray(sliding))
    else:
      for layer, s in zip(self.layers_list, sliding):
        x = layer(x, positions, masks, s, cache_index)
    return self.norm(x)


class Llama(_DecoderOptions):
  """Decoder-only LM. ``__call__(input_ids [B, T]) -> logits [B, T, V]`` (float32).

  Attributes:
    config: the architecture (any family of :data:`SUPPORTED_MODEL_TYPES`).
    dtype: compute dtype (``jnp.bfloat16`` for speed); norms and logits are float32.
    param_dtype: parameter dtype.
    scan_layers: stack the layers under ``nn.scan`` (params get a leading ``[L]`` axis
      under ``model/layers``); else ``model/layers_{i}``.
    remat: ``"none"``, ``"full"`` or ``"dots"``: rematerialize each layer in the backward pass.
    attention_impl: passed to ``jax.nn.dot_product_attention`` (None: XLA picks;
      ``"cudnn"`` on GPU).
  """

  def setup(self):
    c = self.config
    self.model = LlamaModel(c, self.dtype, self.param_dtype, self.scan_layers, self.remat,
                            self.attention_impl)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(
          c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")))

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None,
               return_hidden: bool = False, logits_at: Array | None = None,
               cache_index: Array | None = None) -> Array:
    """Args: ``input_ids [B, T]`` int; ``attention_mask [B, T]`` 1 = token, 0 = pad;
    ``positions [B, T]`` (default ``arange``; packed rows restart per segment);
    ``segment_ids [B, T]`` (packed rows: attention stays within a segment);
    ``logits_at [B, K]`` int: compute logits only at these positions (saves the
    ``[B, T, V]`` LM-head product when only a few positions carry loss);
    ``cache_index`` int32 scalar: decode against the KV cache in the ``"cache"``
    collection (apply with ``mutable=["cache"]``): the ``T`` tokens are written at cache
    slots ``cache_index + [0, T)`` and attend to every earlier slot; ``attention_mask``
    is then ``[B, S]`` over all ``S`` cache slots (1 = a real token is or will be there)
    and ``positions`` default to ``cache_index + arange(T)``.

    Returns logits ``[B, T, V]`` (or ``[B, K, V]``) float32, or the final hidden
    states ``[B, T, D]`` with ``return_hidden``.
    """
    h = self.model(input_ids, attention_mask, positions, segment_ids, cache_index)
    if return_hidden:
      return h
    if logits_at is not None:
      h = jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1)
    return self.logits(h)

  def logits(self, hidden: Array) -> Array:
    """``[..., D] -> [..., V]`` float32 through the LM head (or the tied embedding), soft-capped
    by ``final_logit_softcapping`` (Gemma 2)."""
    if self.config.tie_word_embeddings:
      out = self.model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    out = out.astype(jnp.float32)
    cap = self.config.final_logit_softcapping
    if cap is not None:
      out = cap * jnp.tanh(out / cap)
    return nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))


def greedy_generate(model: Llama, params, input_ids: Array, max_new_tokens: int,
                    eos_token_id: int | None = None) -> Array:
  """Greedy continuation ``[B, T + max_new_tokens]`` of unpadded prompts, KV-cached.

  Kept for old callers; :func:`dora_jax.models.generation.generate` does batches with padding,
  sampling and adapters. Rows that produced ``eos_token_id`` continue with it; the output
  is cut after the step where every row has.
  """
  from dora_jax.models.generation import generate
  ids = jnp.asarray(input_ids)
  out = generate(model, params, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                 pad_token_id=eos_token_id if eos_token_id is not None else 0)
  new = out.tokens[:, : int(out.lengths.max())]
  return jnp.concatenate([ids, new.astype(ids.dtype)], axis=1)
