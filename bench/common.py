"""What the benchmarks share: model presets, flop accounting, timing statistics, the environment.

Nothing here touches a JAX backend at import time, so a process may import it
and still hand the GPU to torch (:mod:`bench.peft_compare`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import resource
import statistics
import sys
from typing import Any, Iterable, Mapping, Sequence

from dora_jax.models.llama import LlamaConfig

PRESETS: dict[str, LlamaConfig] = {
    # CPU-sized: a few hundred ms per training step on 2 cores.
    "tiny": LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                        max_position_embeddings=4096, rope_theta=10000.0),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                tie_word_embeddings=True, max_position_embeddings=8192,
                                rope_theta=100000.0, rms_norm_eps=1e-5),
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                  num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                  tie_word_embeddings=False, max_position_embeddings=2048,
                                  rope_theta=10000.0, rms_norm_eps=1e-5),
}
"""Llama shapes (random weights). ``smollm2-135m`` and ``tinyllama-1.1b`` match the HF models."""

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    # (device_kind substring, dense bf16 flop/s, dense fp32 flop/s as XLA runs it: TF32 on tensor cores)
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989.4e12, 494.7e12),
    ("H200", 989.4e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("L4", 121e12, 60e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v6", 918e12, 918e12),
)
"""Vendor dense peak flop/s; CPUs have no entry (MFU is then ``null``)."""

FLOPS_NOTE = (
    "model flops per step, counted (not measured): forward = 2*N_matmul*tokens (frozen projections"
    " and LM head; embedding lookup excluded) + attention 4*L*H*hd*T per token (QK^T and AV, full"
    " T x T, no causal halving) + adapters 2*r*(I+O) per adapted matrix per token; backward ="
    " activation gradients only for frozen matmuls (1x their forward: no frozen weight gradients),"
    " 2x forward for attention (both operands) and for adapters (input and weight gradients);"
    " DoRA adds 2*I*O*r per adapted matrix per step for the norm. Remat recompute is not counted."
    " frozen-forward counts the forward only. MFU = flops / median step time / dense peak of the"
    " device in the compute dtype (null where unknown, e.g. CPU)."
)


@dataclasses.dataclass(frozen=True)
class AdaptedMatrix:
  """One adapted kernel as a matrix ``[I, O]``, ``count`` times (stacked layers)."""

  i_dim: int
  o_dim: int
  count: int


def model_flops(config: LlamaConfig, batch: int, seq: int, *, train: bool, rank: int = 0,
                adapted: Sequence[AdaptedMatrix] = (), dora: bool = False) -> dict[str, float]:
  """Model flops of one step (see :data:`FLOPS_NOTE`).

  Returns:
    ``{"forward": ..., "backward": ..., "total": ..., "per_token": ...}`` flops.
  """
  tokens = batch * seq
  per_token_fwd = config.flops_per_token(seq)  # 2*N_matmul + attention
  attn = per_token_fwd - 2 * (config.num_params() - (0 if config.tie_word_embeddings
                                                     else config.vocab_size * config.hidden_size))
  dense = per_token_fwd - attn
  adapter = sum(2 * rank * (m.i_dim + m.o_dim) * m.count for m in adapted)
  forward = tokens * (dense + attn + adapter)
  backward = tokens * (dense + 2 * attn + 2 * adapter) if train else 0.0
  norm = sum(2 * m.i_dim * m.o_dim * rank * m.count for m in adapted) if dora else 0.0
  total = forward + backward + norm
  return {"forward": float(forward), "backward": float(backward), "dora_norm": float(norm),
          "total": float(total), "per_token": float(total / tokens)}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak flop/s of a device kind in ``dtype``, or None when unknown (CPUs)."""
  for key, bf16, fp32 in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return bf16 if dtype in ("bfloat16", "float16") else fp32
  return None


def time_stats(seconds: Sequence[float]) -> dict[str, float]:
  """Median, p10, p90, quartiles, mean and min of step times, in milliseconds."""
  ms = sorted(1e3 * s for s in seconds)
  q = lambda p: _quantile(ms, p)
  return {"median_ms": q(0.5), "p10_ms": q(0.1), "p90_ms": q(0.9), "p25_ms": q(0.25),
          "p75_ms": q(0.75), "iqr_ms": q(0.75) - q(0.25), "mean_ms": statistics.fmean(ms),
          "min_ms": ms[0], "n": len(ms)}


def _quantile(sorted_values: Sequence[float], p: float) -> float:
  """Linear-interpolated quantile of sorted values."""
  pos = p * (len(sorted_values) - 1)
  lo, hi = math.floor(pos), math.ceil(pos)
  return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def process_max_rss_bytes() -> int:
  """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def host_info() -> dict[str, Any]:
  """CPU count, load average and Python version: context for CPU timings."""
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"cpu_count": os.cpu_count(), "loadavg_1m": None if load is None else round(load[0], 2),
          "python": platform.python_version()}


def parse_list(text: str | None, default: Iterable[str] = ()) -> tuple[str, ...]:
  """``"a,b"`` -> ``("a", "b")``; empty or None gives ``default``."""
  if not text:
    return tuple(default)
  return tuple(t.strip() for t in text.split(",") if t.strip())


def ratio(num: float | None, den: float | None) -> float | None:
  """``num / den`` rounded to 4 places, or None when either is missing."""
  if num is None or den in (None, 0):
    return None
  return round(num / den, 4)


def json_ready(value: Any) -> Any:
  """Rounds floats (6 significant digits) through nested dicts and lists, for compact JSON lines."""
  if isinstance(value, float):
    return float(f"{value:.6g}")
  if isinstance(value, Mapping):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  return value
