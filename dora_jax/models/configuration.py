"""The architecture of the decoders in :mod:`dora_jax.models.llama`: :class:`LlamaConfig`.

Hugging Face config field names; :meth:`LlamaConfig.from_hf` reads transformers 5's
``rope_parameters`` (flat, or per layer type for Gemma 3) and the legacy keys, and
:meth:`LlamaConfig.to_hf_dict` writes a ``config.json`` transformers loads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
QK_NORM_MODEL_TYPES = ("qwen3", "gemma3_text")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture (Hugging Face config field names; the families: :mod:`dora_jax.models.llama`).

  Family-specific fields (``None`` = the family's default or absent):
    hidden_act: ``silu`` (default) or ``gelu_pytorch_tanh`` (Gemma's default).
    sliding_window: window ``W`` of the layers marked ``sliding_attention``.
    layer_types: per layer ``full_attention`` / ``sliding_attention``; with a window and no
      types, Mistral (and Llama-like types) slide on every layer, Gemma 2 on even layers,
      Gemma 3 on all but every 6th.
    query_pre_attn_scalar: scores are scaled by its ``-1/2`` power (default ``head_dim``).
    attn_logit_softcapping, final_logit_softcapping: Gemma 2's ``c·tanh(x / c)`` caps.
    rope_local_base_freq: Gemma 3's RoPE base on sliding layers (default 10000).
  """

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
  eos_token_id: int | tuple[int, ...] | None = 2  # a list becomes a tuple (hashable)
  hidden_act: str | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rope_local_base_freq: float | None = None

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"Unsupported model_type {self.model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}.")
    if self.head_dim is None:
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of"
          f" num_key_value_heads={self.num_key_value_heads}.")
    if self.rope_scaling is not None:
      set_("rope_scaling", _FrozenDict(self.rope_scaling))
    if isinstance(self.eos_token_id, list):
      set_("eos_token_id", tuple(self.eos_token_id))
    if self.attention_bias and self.model_type != "qwen2":
      raise ValueError(
          f"attention_bias=True with model_type={self.model_type!r}: that also adds an o_proj bias,"
          " which this model does not implement; only Qwen2's q/k/v biases (model_type='qwen2')"
          " are supported.")
    if self.hidden_act is None:
      set_("hidden_act", "gelu_pytorch_tanh" if self.is_gemma else "silu")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; supported: {list(ACTIVATIONS)}.")
    gemma_only = {k: getattr(self, k) for k in ("attn_logit_softcapping", "final_logit_softcapping",
                                                "query_pre_attn_scalar", "rope_local_base_freq")}
    if not self.is_gemma and any(v is not None for v in gemma_only.values()):
      raise ValueError(f"{[k for k, v in gemma_only.items() if v is not None]} are Gemma fields;"
                       f" model_type={self.model_type!r} has none.")
    if self.model_type == "gemma3_text" and self.rope_local_base_freq is None:
      set_("rope_local_base_freq", 10000.0)
    self._normalize_layer_types()

  def _normalize_layer_types(self):
    n, lt = self.num_hidden_layers, self.layer_types
    if lt is not None:
      lt = tuple(lt)
      bad = sorted(set(lt) - set(LAYER_TYPES))
      if len(lt) != n or bad:
        raise ValueError(f"layer_types must list {n} entries from {list(LAYER_TYPES)}; got {len(lt)}"
                         + (f" with unsupported {bad}" if bad else "") + ".")
    if self.sliding_window is not None:
      if self.model_type == "llama":
        raise ValueError("model_type='llama' has no sliding window (transformers' Llama ignores it);"
                         " use model_type='mistral' for a sliding window on every layer.")
      if lt is None:
        every = {"gemma2": 2, "gemma3_text": 6}.get(self.model_type, 1)
        lt = tuple("full_attention" if every > 1 and (i + 1) % every == 0 else "sliding_attention"
                   for i in range(n))
    if self.sliding_window is None or lt is None or "sliding_attention" not in lt:
      lt, window = None, None
    else:
      window = int(self.sliding_window)
    object.__setattr__(self, "layer_types", lt)
    object.__setattr__(self, "sliding_window", window)

  # -- family traits

  @property
  def is_gemma(self) -> bool:
    """Gemma's (1 + w) norms, scaled embeddings, sandwich norms."""
    return self.model_type in GEMMA_MODEL_TYPES

  @property
  def qk_norm(self) -> bool:
    """RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)."""
    return self.model_type in QK_NORM_MODEL_TYPES

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it attends within ``sliding_window``."""
    if self.layer_types is None:
      return (False,) * self.num_hidden_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def attention_scale(self) -> float | None:
    """The score scale when it is not ``head_dim ** -0.5`` (else None)."""
    return None if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5

  # -- Hugging Face configs

  @classmethod
  def from_hf(cls, hf: Any) -> "LlamaConfig":
    """From a transformers config object or its dict (transformers 5 or legacy keys)."""
    d = hf if isinstance(hf, Mapping) else hf.to_dict()
    model_type = d.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
      hint = (" Gemma 3 multimodal checkpoints ('gemma3') are not supported; text-only"
              " Gemma3ForCausalLM ones ('gemma3_text') are.") if model_type == "gemma3" else ""
      raise ValueError(f"Unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}.{hint}")
    if d.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention=True is an encoder, not a causal LM; not supported.")
    theta, scaling, local = _rope_from_hf(d, model_type)
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window") is False:
      window = None
    layer_types = None if model_type == "mistral" else d.get("layer_types")
    if model_type == "gemma3_text" and layer_types is None and window is not None:
      every = d.get("sliding_window_pattern", 6)
      layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                     for i in range(d["num_hidden_layers"])]
    gemma = model_type in GEMMA_MODEL_TYPES
    return cls(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
        model_type=model_type, bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        hidden_act=(d.get("hidden_activation") or d.get("hidden_act")) if gemma else d.get("hidden_act"),
        sliding_window=window, layer_types=tuple(layer_types) if layer_types else None,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if gemma else None,
        attn_logit_softcapping=d.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcapping=d.get("final_logit_softcapping") if gemma else None,
        rope_local_base_freq=local)

  def to_hf_dict(self) -> dict[str, Any]:
    """A ``config.json`` dict that transformers reads."""
    mt = self.model_type
    d = {
        "architectures": [ARCHITECTURES[mt]], "model_type": mt,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": self.hidden_act,
        "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
    }
    types = ["sliding_attention" if s else "full_attention" for s in self.sliding_layers]
    if mt == "llama":
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = False
    elif mt == "mistral":
      d["sliding_window"] = self.sliding_window
    elif mt in ("qwen2", "qwen3"):
      d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
               layer_types=types, max_window_layers=self.num_hidden_layers)
      if mt == "qwen3":
        d["attention_bias"] = False
    else:  # gemma
      d.update(hidden_activation=d.pop("hidden_act"), attention_bias=False,
               query_pre_attn_scalar=self.query_pre_attn_scalar, sliding_window=self.sliding_window,
               layer_types=types, attn_logit_softcapping=self.attn_logit_softcapping,
               final_logit_softcapping=self.final_logit_softcapping)
      if mt == "gemma3_text":
        full = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        full.pop("type", None)
        d["rope_parameters"] = {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": self.rope_local_base_freq}}
        del d["rope_theta"], d["rope_scaling"]
    return d

  # -- sizes

  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
    attn += 2 * hd if self.qk_norm else 0
    layer = attn + 3 * d * f + (4 if self.is_gemma else 2) * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_hidden_layers * layer + d + head

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul flops per token: ``2·(matmul params)`` + attention scores and values.

    The embedding lookup is not a matmul; a tied embedding is (as the LM head).
    """
    matmul_params = self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
    attn = 2 * 2 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
    return float(2 * matmul_params + attn)


def _rope_from_hf(d: Mapping[str, Any], model_type: str) -> tuple[float, dict | None, float | None]:
  """``(rope_theta, rope_scaling, rope_local_base_freq)`` from transformers 5's ``rope_parameters``
  (flat, or per layer type for Gemma 3) or the legacy ``rope_theta`` / ``rope_scaling`` keys."""
  params = d.get("rope_parameters") or {}
  local = d.get("rope_local_base_freq")
  if "full_attention" in params or "sliding_attention" in params:
    sliding = params.get("sliding_attention") or {}
    if sliding.get("rope_type", "default") != "default":
      raise ValueError(f"RoPE type {sliding['rope_type']!r} on sliding layers is not supported (only default).")
    local = sliding.get("rope_theta", local)
    params = params.get("full_attention") or {}
  theta = params.get("rope_theta", d.get("rope_theta"))
  scaling = d.get("rope_scaling")
  if params.get("rope_type", "default") != "default":
    # rope_parameters also holds rope_theta, which is a field of its own here.
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
    scaling = None
  if theta is None:
    theta = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
  if model_type == "gemma3_text" and local is None:
    local = 10000.0
  return float(theta), scaling, (float(local) if model_type == "gemma3_text" else None)


class _FrozenDict(dict):
  """A hashable dict (the config is a static jit argument)."""

  def __hash__(self):
    return hash(tuple(sorted((k, str(v)) for k, v in self.items())))
