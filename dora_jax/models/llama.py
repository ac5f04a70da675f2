"""A Flax Linen decoder for the Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5.

Parameter names mirror Hugging Face's module names, so adapters target them the
PEFT way (``q_proj``, ``v_proj``, ...)::

    {"model": {"embed_tokens": {"embedding": [V, D]},
               "layers_0": {...}, ...            # or "layers": {...} stacked [L, ...] with scan_layers
               "norm": {"scale": [D]}},
     "lm_head": {"kernel": [D, V]}}             # absent with tied embeddings
    layer = {"self_attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
             "mlp": {"gate_proj", "up_proj", "down_proj"},
             "input_layernorm", "post_attention_layernorm"}

Projections are ``nn.Dense`` with 2-D kernels ``[in, out]`` (the HF weight
transposed). Every parameter carries logical axis names (see
:data:`LOGICAL_AXIS_RULES`) for mesh sharding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture (Hugging Face ``LlamaConfig`` field names)."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  model_type: str = "llama"
  bos_token_id: int | None = 1
  eos_token_id: int | list[int] | None = 2

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of"
          f" num_key_value_heads={self.num_key_value_heads}.")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))
    if self.attention_bias and self.model_type != "qwen2":
      raise ValueError(
          f"attention_bias=True with model_type={self.model_type!r}: Llama's attention_bias also"
          " adds an o_proj bias, which this model does not implement; only Qwen2's q/k/v biases"
          " (model_type='qwen2') are supported.")

  @classmethod
  def from_hf(cls, hf: Any) -> "LlamaConfig":
    """From a transformers config object or its dict."""
    d = hf if isinstance(hf, Mapping) else hf.to_dict()
    model_type = d.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
          " (Llama-family decoders).")
    rope_scaling = d.get("rope_scaling")
    rope_theta = d.get("rope_theta")
    rope_params = d.get("rope_parameters")  # transformers 5 keeps theta and scaling here
    if rope_params:
      rope_theta = rope_params.get("rope_theta", rope_theta)
      if rope_params.get("rope_type", "default") != "default":
        # rope_parameters also holds rope_theta, which is a field of its own here.
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
      rope_scaling = None
    return cls(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta if rope_theta is not None else 10000.0,
        rope_scaling=rope_scaling,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
        model_type=model_type, bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))

  def to_hf_dict(self) -> dict[str, Any]:
    """A ``config.json`` dict that transformers reads."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    d = {
        "architectures": [arch[self.model_type]], "model_type": self.model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
    }
    if self.model_type == "llama":
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = False
    return d

  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_hidden_layers * layer + d + head

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul flops per token: ``2·(matmul params)`` + attention scores and values.

    The embedding lookup is not a matmul; a tied embedding is (as the LM head).
    """
    matmul_params = self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
    attn = 2 * 2 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
    return float(2 * matmul_params + attn)


class _FrozenDict(dict):
  """A hashable dict (the config is a static jit argument)."""

  def __hash__(self):
    return hash(tuple(sorted((k, str(v)) for k, v in self.items())))


def rope_frequencies(config: LlamaConfig) -> Array:
  """Inverse frequencies ``[head_dim // 2]`` (float32), llama3 scaling applied."""
  hd = config.head_dim
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  sc = config.rope_scaling
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


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(features: int, axes: tuple[str, str], name: str, cfg: "Llama", bias: bool = False) -> nn.Dense:
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
  def __call__(self, x, positions, mask):
    c = self.config
    b, t, _ = x.shape
    hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q = _dense(nh * hd, ("embed", "heads"), "q_proj", self, c.attention_bias)(x).reshape(b, t, nh, hd)
    k = _dense(nkv * hd, ("embed", "kv_heads"), "k_proj", self, c.attention_bias)(x).reshape(b, t, nkv, hd)
    v = _dense(nkv * hd, ("embed", "kv_heads"), "v_proj", self, c.attention_bias)(x).reshape(b, t, nkv, hd)
    inv_freq = rope_frequencies(c)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
    # mask None: plain causal attention (lets cuDNN skip the masked half).
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
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
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return _dense(c.hidden_size, ("mlp", "embed"), "down_proj", self)(h)


class DecoderLayer(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, positions, mask):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)
    h = x + Attention(c, self.dtype, self.param_dtype, self.attention_impl, name="self_attn")(
        norm("input_layernorm")(x), positions, mask)
    out = h + MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(h))
    return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))


class _ScanLayer(DecoderLayer):
  @nn.compact
  def __call__(self, x, positions_mask):
    positions, mask = positions_mask
    return super().__call__(x, positions, mask), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def attention_mask(t: int, attention_mask: Array | None, segment_ids: Array | None) -> Array:
  """Boolean ``[B|1, 1, T, T]`` mask: causal, within a segment, not to padding; ``None``
  when there is neither padding nor packing (then attention is just causal)."""
  if attention_mask is None and segment_ids is None:
    return None
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
  mask = causal
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = mask & same
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, None, :]
  if segment_ids is not None or attention_mask is not None:
    # A padded query row attending to nothing would give NaN: let it see itself.
    mask = mask | jnp.eye(t, dtype=bool)[None, None]
  return mask


class LlamaModel(nn.Module):
  """The decoder stack (HF's ``model``): embeddings, layers, final norm."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str | None = None

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
          layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,), length=c.num_hidden_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(**kw)
    else:
      layer = nn.remat(DecoderLayer, policy=policy) if policy else DecoderLayer
      self.layers_list = [layer(**kw, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

  def __call__(self, input_ids, attention_mask_=None, positions=None, segment_ids=None):
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(t, attention_mask_, segment_ids)
    x = self.embed_tokens(input_ids)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    if self.scan_layers:
      x, _ = self.layers(x, (positions, mask))
    else:
      for layer in self.layers_list:
        x = layer(x, positions, mask)
    return self.norm(x)


class Llama(nn.Module):
  """Decoder-only LM. ``__call__(input_ids [B, T]) -> logits [B, T, V]`` (float32).

  Attributes:
    config: the architecture.
    dtype: compute dtype (``jnp.bfloat16`` for speed); norms and logits are float32.
    param_dtype: parameter dtype.
    scan_layers: stack the layers under ``nn.scan`` (params get a leading ``[L]`` axis
      under ``model/layers``); else ``model/layers_{i}``.
    remat: ``"none"``, ``"full"`` or ``"dots"``: rematerialize each layer in the backward pass.
    attention_impl: passed to ``jax.nn.dot_product_attention`` (None: XLA picks;
      ``"cudnn"`` on GPU).
  """

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str | None = None

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
               return_hidden: bool = False, logits_at: Array | None = None) -> Array:
    """Args: ``input_ids [B, T]`` int; ``attention_mask [B, T]`` 1 = token, 0 = pad;
    ``positions [B, T]`` (default ``arange``; packed rows restart per segment);
    ``segment_ids [B, T]`` (packed rows: attention stays within a segment);
    ``logits_at [B, K]`` int: compute logits only at these positions (saves the
    ``[B, T, V]`` LM-head product when only a few positions carry loss).

    Returns logits ``[B, T, V]`` (or ``[B, K, V]``) float32, or the final hidden
    states ``[B, T, D]`` with ``return_hidden``.
    """
    h = self.model(input_ids, attention_mask, positions, segment_ids)
    if return_hidden:
      return h
    if logits_at is not None:
      h = jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1)
    return self.logits(h)

  def logits(self, hidden: Array) -> Array:
    """``[..., D] -> [..., V]`` float32 through the LM head (or the tied embedding)."""
    if self.config.tie_word_embeddings:
      out = self.model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))


def greedy_generate(model: Llama, params, input_ids: Array, max_new_tokens: int,
                    eos_token_id: int | None = None) -> Array:
  """Greedy continuation ``[B, T + max_new_tokens]`` (full recompute per token; for checks)."""
  ids = jnp.asarray(input_ids)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[:, -1])
  for _ in range(max_new_tokens):
    nxt = jnp.argmax(fwd(params, ids), axis=-1).astype(ids.dtype)
    ids = jnp.concatenate([ids, nxt[:, None]], axis=1)
    if eos_token_id is not None and bool(jnp.all(nxt == eos_token_id)):
      break
  return ids
