"""The adapter configuration, with HF PEFT's field names and meanings."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from typing import Any, Sequence

import jax.numpy as jnp

ADAPTER_KEYS = ("lora_a", "lora_b", "magnitude")
"""Leaf names an adapter dict may hold next to a kernel."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how; the field names follow ``peft.LoraConfig``.

  Attributes:
    r: rank of the update ``ΔW = s·A B`` (``A: [I, r]``, ``B: [r, O]``).
    lora_alpha: scale numerator: ``s = lora_alpha / r`` (rsLoRA:
      ``lora_alpha / sqrt(r)``).
    target_modules: which modules to adapt. A sequence of module-name suffixes
      (``("q_proj", "v_proj")`` matches ``model/layers/self_attn/q_proj``), or a
      regex string matched in full against the ``/``-joined module path, or
      ``"all-linear"`` for every 2-D ``kernel`` except an ``lm_head``.
    exclude_modules: same forms as ``target_modules``; matches are skipped.
    lora_dropout: dropout probability on the adapter's input (training only).
    use_dora: decompose into magnitude and direction (DoRA) instead of LoRA.
    use_rslora: use ``lora_alpha / sqrt(r)`` as the scale.
    init_lora_weights: ``True`` (Kaiming-uniform ``A`` as in PEFT, zero ``B``),
      ``"gaussian"`` (``A ~ N(0, 1/r)``, zero ``B``) or ``False`` (random
      ``A`` and ``B``: the adapted model differs from the base; for tests).
    adapter_dtype: dtype of the adapter parameters (``float32`` by default,
      whatever the base dtype).
  """

  r: int = 8
  lora_alpha: float = 8.0
  target_modules: Sequence[str] | str | None = None
  exclude_modules: Sequence[str] | str | None = None
  lora_dropout: float = 0.0
  use_dora: bool = False
  use_rslora: bool = False
  init_lora_weights: bool | str = True
  adapter_dtype: Any = jnp.float32

  def __post_init__(self):
    """Checks every field; numpy scalars (``np.int64(4)``) become Python numbers.

    Raises:
      ValueError: naming the field, the bad value and what is expected.
    """
    if not isinstance(self.r, numbers.Integral) or isinstance(self.r, bool) or self.r <= 0:
      raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
    object.__setattr__(self, "r", int(self.r))
    alpha = self.lora_alpha
    if (not isinstance(alpha, numbers.Real) or isinstance(alpha, bool)
        or not math.isfinite(float(alpha))):
      raise ValueError(
          f"LoraConfig.lora_alpha must be a finite number (the scale is lora_alpha / r), got"
          f" {alpha!r}.")
    if not isinstance(alpha, (int, float)):  # numpy scalars: JSON and hashing need Python numbers
      object.__setattr__(self, "lora_alpha", float(alpha))
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(
          f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}."
      )
    if self.init_lora_weights not in (True, False, "gaussian"):
      raise ValueError(
          "LoraConfig.init_lora_weights must be True (Kaiming-uniform A, zero B),"
          f" 'gaussian' or False, got {self.init_lora_weights!r}."
      )
    if self.target_modules is None:
      raise ValueError(
          "LoraConfig.target_modules is required: a list of module-name suffixes"
          " such as ['q_proj', 'v_proj'], a regex matched against the '/'-joined"
          " module path, or 'all-linear'."
      )
    for name in ("target_modules", "exclude_modules"):
      value = getattr(self, name)
      if isinstance(value, str) and value != "all-linear":
        try:
          re.compile(value)
        except re.error as e:
          raise ValueError(
              f"LoraConfig.{name}={value!r} is not a valid regex ({e}); give a valid regex matched"
              " in full against the '/'-joined module path, or a list of module-name suffixes."
          ) from None
    # Lists are unhashable; keep the dataclass hashable so it can be a static jit arg.
    for name in ("target_modules", "exclude_modules"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, str):
        object.__setattr__(self, name, tuple(value))

  @property
  def scale(self) -> float:
    """The factor ``s`` in ``W0 + s·A B``."""
    if self.use_rslora:
      return self.lora_alpha / math.sqrt(self.r)
    return self.lora_alpha / self.r

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly dict (the adapter dtype as its name)."""
    d = dataclasses.asdict(self)
    d["adapter_dtype"] = jnp.dtype(self.adapter_dtype).name
    for name in ("target_modules", "exclude_modules"):
      if isinstance(d[name], tuple):
        d[name] = list(d[name])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
    """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"Unknown LoraConfig fields {unknown}; known: {sorted(fields)}.")
    d = dict(d)
    if "adapter_dtype" in d:
      d["adapter_dtype"] = jnp.dtype(d["adapter_dtype"])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)
