"""The adapter configuration, with HF PEFT's field names and meanings."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from dora_jax import variants as _variants
from dora_jax.variants import lora as _lora
from dora_jax.variants import vera as _vera

_variants.register(_vera.VARIANT)


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
      ``"gaussian"`` (``A ~ N(0, 1/r)``, zero ``B``), ``False`` (random
      ``A`` and ``B``: the adapted model differs from the base; for tests),
      ``"orthogonal"`` (PEFT's orthogonal ``A``, ``B`` with ``A B = 0``; even ``r``),
      or an init that moves part of ``W0`` into the adapter (:attr:`modifies_base`):
      ``"pissa"`` (top-``r`` SVD), ``"pissa_niter_N"`` (randomized SVD, ``N`` subspace
      iterations), ``"olora"`` (QR); these need
      :func:`dora_jax.init_adapters_and_base`, which also returns the residual base.
      Linear-type modules only (PEFT's Conv refuses them, its Embedding ignores them).
    adapter_dtype: dtype of the adapter parameters (``float32`` by default,
      whatever the base dtype).
    rank_pattern: PEFT's per-module ranks ``{pattern: r}``; a module whose ``/``-joined
      path matches ``(.*/)?(pattern)`` in full (PEFT's ``(.*\.)?(key)$``; a ``.`` in a PEFT
      key matches the ``/``) gets that ``r``; the first matching key wins (PEFT's
      ``get_pattern_key``). Stored as a tuple of pairs (hashable); :meth:`to_dict` gives a dict.
    alpha_pattern: PEFT's per-module ``lora_alpha`` ``{pattern: alpha}``, same matching.
      A module's scale is its ``alpha / r`` (:meth:`for_module`).
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
  rank_pattern: Any = ()
  alpha_pattern: Any = ()

  def __post_init__(self):
    """Checks every field; numpy scalars (``np.int64(4)``) become Python numbers.

    Raises:
      ValueError: naming the field, the bad value and what is expected.
    """
    _check_rank(self)
    alpha = self.lora_alpha
    if (not isinstance(alpha, numbers.Real) or isinstance(alpha, bool)
        or not math.isfinite(float(alpha))):
      raise ValueError(
          f"LoraConfig.lora_alpha must be a finite number (the scale is lora_alpha / r), got"
          f" {alpha!r}.")
    if not isinstance(alpha, (int, float)):  # numpy scalars: JSON and hashing need Python numbers
      object.__setattr__(self, "lora_alpha", float(alpha))
    _check_dropout(self, "lora_dropout")
    if not _known_init(self.init_lora_weights):
      raise ValueError(
          "LoraConfig.init_lora_weights must be True (Kaiming-uniform A, zero B),"
          " 'gaussian', False, 'orthogonal', 'pissa', 'pissa_niter_N' (N an integer >= 0) or"
          f" 'olora', got {self.init_lora_weights!r}."
      )
    _check_targets(self)
    for name, check in (("rank_pattern", _positive_int), ("alpha_pattern", _finite_number)):
      object.__setattr__(self, name, _pattern_pairs(name, getattr(self, name), check))
    if self.init_lora_weights == "orthogonal":
      odd = sorted({x for x in (self.r, *(v for _, v in self.rank_pattern)) if x % 2})
      if odd:
        raise ValueError(
            f"init_lora_weights='orthogonal' needs an even rank (half of A's and B's rows come"
            f" from each half of one orthogonal matrix, PEFT's orthogonal_init); got r={odd}."
            " Use an even r (and even rank_pattern values).")

  @property
  def modifies_base(self) -> bool:
    """Whether the init moves ``s·A0 B0`` out of the base weight (PiSSA, OLoRA): the adapter
    then runs on the residual ``W0 − s·A0 B0`` (:func:`dora_jax.init_adapters_and_base`)."""
    return modifies_base(self.init_lora_weights)

  @property
  def variant(self):
    """The method variant: :data:`dora_jax.variants.lora.VARIANT`."""
    return _lora.VARIANT

  @property
  def adapter_dropout(self) -> float:
    """The dropout probability on the adapter input (``lora_dropout``)."""
    return self.lora_dropout

  @property
  def scale(self) -> float:
    """The factor ``s`` in ``W0 + s·A B``."""
    if self.use_rslora:
      return self.lora_alpha / math.sqrt(self.r)
    return self.lora_alpha / self.r

  def for_module(self, path: str) -> "LoraConfig":
    """The config of the module at ``path`` (``/``-joined): ``r`` and ``lora_alpha`` from
    :attr:`rank_pattern` / :attr:`alpha_pattern` where a key matches (PEFT's
    ``LoraModel._create_and_replace``), the patterns emptied; ``self`` without patterns."""
    if not self.rank_pattern and not self.alpha_pattern:
      return self
    return dataclasses.replace(
        self, r=_pattern_value(self.rank_pattern, path, self.r),
        lora_alpha=_pattern_value(self.alpha_pattern, path, self.lora_alpha),
        rank_pattern=(), alpha_pattern=())

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly dict (the adapter dtype as its name)."""
    d = _to_dict(self)
    d["rank_pattern"], d["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
    """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError``."""
    return _from_dict(cls, d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class VeraConfig:
  """VeRA (and, with ``use_dora``, DVoRA); the field names follow ``peft.VeraConfig``.

  Attributes:
    r: rank of the shared projections (PEFT's default 256). It may exceed a layer's
      dimensions, as in PEFT (the projections are not per layer).
    target_modules, exclude_modules: as :class:`LoraConfig`.
    projection_prng_key: seed of the shared frozen projections ``vera_A``, ``vera_B``.
    save_projection: store the projections in saved adapters (PEFT's default True);
      with False they are re-drawn from ``projection_prng_key`` at load time.
    vera_dropout: dropout probability on the adapter's input (training only).
    d_initial: initial value of every ``vera_lambda_d`` entry (PEFT's 0.1).
    fan_in_fan_out: PEFT's flag for transposed (Conv1D) weights; Flax kernels are always
      ``[in, out]``, so only ``False`` is meaningful.
    use_dora: DVoRA (DoRA paper §5): DoRA's magnitude over the VeRA direction update.
    adapter_dtype: dtype of the trainable vectors (``float32`` by default).
  """

  r: int = 256
  target_modules: Sequence[str] | str | None = None
  exclude_modules: Sequence[str] | str | None = None
  projection_prng_key: int = 0
  save_projection: bool = True
  vera_dropout: float = 0.0
  d_initial: float = 0.1
  fan_in_fan_out: bool = False
  use_dora: bool = False
  adapter_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_rank(self)
    _check_dropout(self, "vera_dropout")
    if not math.isfinite(self.d_initial):
      raise ValueError(f"VeraConfig.d_initial must be finite, got {self.d_initial!r}.")
    if self.fan_in_fan_out:
      raise ValueError("VeraConfig.fan_in_fan_out=True is for torch Conv1D weights; Flax kernels"
                       " are [in, out] already: leave it False.")
    _check_targets(self)

  @property
  def variant(self):
    """The method variant: :data:`dora_jax.variants.vera.VARIANT`."""
    return _vera.VARIANT

  @property
  def adapter_dropout(self) -> float:
    """The dropout probability on the adapter input (``vera_dropout``)."""
    return self.vera_dropout

  @property
  def scale(self) -> float:
    """VeRA has no separate scale: the vectors carry it."""
    return 1.0

  def max_rank(self, i_dim: int, o_dim: int) -> float:
    """Any rank fits a layer (the projections are shared and sliced on I and O only)."""
    del i_dim, o_dim
    return math.inf

  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VeraConfig":
    return _from_dict(cls, d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def modifies_base(init: Any) -> bool:
  """Whether ``init_lora_weights=init`` changes the base weight (PiSSA, OLoRA; PEFT's
  ``pissa_init`` / ``olora_init`` write ``W0 − s·B0 A0`` into the base layer)."""
  return isinstance(init, str) and (init == "pissa" or init == "olora"
                                    or _PISSA_NITER.fullmatch(init) is not None)


def _known_init(init: Any) -> bool:
  if isinstance(init, bool):
    return True
  return init in ("gaussian", "orthogonal") or modifies_base(init)


def _positive_int(v) -> int | None:
  ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
  return int(v) if ok else None


def _finite_number(v) -> float | None:
  ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
  return (v if isinstance(v, (int, float)) else float(v)) if ok else None


def _pattern_pairs(name: str, value, check) -> tuple[tuple[str, Any], ...]:
  """``{pattern: value}`` (or pairs) as a hashable tuple of pairs, each checked.

  Raises:
    ValueError: for a non-mapping, a bad regex key or a bad value, naming it.
  """
  if value is None:
    return ()
  items = value.items() if isinstance(value, Mapping) else value
  try:
    pairs = [(k, v) for k, v in items]
  except (TypeError, ValueError):
    raise ValueError(f"LoraConfig.{name} must be a dict {{module pattern: value}}, got {value!r}.") from None
  out = []
  for k, v in pairs:
    if not isinstance(k, str):
      raise ValueError(f"LoraConfig.{name} keys must be module-name patterns (str), got {k!r}.")
    try:
      re.compile(k)
    except re.error as e:
      raise ValueError(f"LoraConfig.{name} key {k!r} is not a valid regex ({e}).") from None
    checked = check(v)
    if checked is None:
      what = "a positive integer rank" if name == "rank_pattern" else "a finite lora_alpha"
      raise ValueError(f"LoraConfig.{name}[{k!r}] must be {what}, got {v!r}.")
    out.append((k, checked))
  return tuple(out)


def _pattern_value(pairs, path: str, default):
  """The value of the first key of ``pairs`` matching ``path`` as PEFT matches module names."""
  for key, value in pairs:
    if re.fullmatch(rf"(.*/)?(?:{key})", path):
      return value
  return default


def _check_rank(config) -> None:
  """``r`` must be a positive integer (numpy integers accepted, stored as ``int``)."""
  r = config.r
  if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r <= 0:
    raise ValueError(f"{type(config).__name__}.r must be a positive integer, got {r!r}.")
  object.__setattr__(config, "r", int(r))


def _check_dropout(config, name: str) -> None:
  value = getattr(config, name)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{type(config).__name__}.{name} must be in [0, 1), got {value!r}.")


def _check_targets(config) -> None:
  """``target_modules`` is required; a regex must compile; lists become tuples (hashable:
  a config is a static ``jit`` argument)."""
  owner = type(config).__name__
  if config.target_modules is None:
    raise ValueError(
        f"{owner}.target_modules is required: a list of module-name suffixes such as"
        " ['q_proj', 'v_proj'], a regex matched against the '/'-joined module path, or"
        " 'all-linear'.")
  for name in ("target_modules", "exclude_modules"):
    value = getattr(config, name)
    if isinstance(value, str) and value != "all-linear":
      try:
        re.compile(value)
      except re.error as e:
        raise ValueError(
            f"{owner}.{name}={value!r} is not a valid regex ({e}); give a valid regex matched"
            " in full against the '/'-joined module path, or a list of module-name suffixes."
        ) from None
    elif value is not None and not isinstance(value, str):
      bad = [v for v in value if not isinstance(v, str)]
      if bad:
        raise ValueError(f"{owner}.{name} entries must be module names (strings), got {bad!r}.")
      object.__setattr__(config, name, tuple(value))


def _to_dict(config) -> dict[str, Any]:
  """A JSON-friendly dict (the adapter dtype as its name) with a ``"method"`` key."""
  d = dataclasses.asdict(config)
  d["adapter_dtype"] = jnp.dtype(config.adapter_dtype).name
  for name in ("target_modules", "exclude_modules"):
    if isinstance(d[name], tuple):
      d[name] = list(d[name])
  return d


def _from_dict(cls, d: dict[str, Any]):
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}.")
  d = dict(d)
  if "adapter_dtype" in d:
    d["adapter_dtype"] = jnp.dtype(d["adapter_dtype"])
  return cls(**d)


CONFIG_TYPES = {"lora": LoraConfig, "vera": VeraConfig}
"""Adapter config class by method variant name."""


def config_from_dict(d: dict[str, Any], method: str = "lora"):
  """The adapter config of ``method`` (``"lora"``, ``"vera"``) from its :meth:`to_dict`."""
  if method not in CONFIG_TYPES:
    raise ValueError(f"Unknown adapter method {method!r}; known: {sorted(CONFIG_TYPES)}.")
  return CONFIG_TYPES[method].from_dict(d)
