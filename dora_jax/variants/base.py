"""What a method variant is: the leaves it puts next to a kernel and how they make ``ΔW``.

A variant (LoRA, VeRA, ...) describes an additive low-rank update of one kernel
``W0: [I, O]`` through *factors*: ``ΔW = s·A B`` with ``A: [I, r]``, ``B: [r, O]``.
Everything else — the factored forward, the DoRA magnitude/direction split, merge,
unmerge, norms, sharding, freezing, checkpoints — is written once over those factors
(:mod:`dora_jax.variants`), in the spirit of PEFT's ``LoraVariant``
(``peft/tuners/lora/variants.py``) but as pure functions. DoRA is not a variant: it is
a magnitude on top of any variant's direction update (``use_dora``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

Array = jax.Array

SHARED_KEY = "shared"
"""Key, at the root of an adapters tree, of the leaves one model shares (VeRA's projections)."""

MAGNITUDE = "magnitude"
"""DoRA's per-output-feature magnitude ``m [*stack, O]``."""


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """One adapter leaf.

  Attributes:
    axes: role of each axis after the stacked ones: ``"in"`` (size ``I``), ``"out"``
      (size ``O``) or ``"rank"`` (size ``r``). Shardings follow it: an ``"in"`` axis is
      sharded like the kernel's input axes, ``"out"`` like its outputs, ``"rank"`` never.
    trainable: whether the optimizer updates it (:mod:`dora_jax.optim`).
    decay: whether weight decay applies (:func:`dora_jax.weight_decay_mask`).
  """

  axes: tuple[str, ...]
  trainable: bool = True
  decay: bool = True


@dataclasses.dataclass(frozen=True)
class Variant:
  """A method as functions of one kernel's adapter leaves.

  Attributes:
    name: the method's name (``"lora"``, ``"vera"``).
    leaves: per-layer leaves ``{name: LeafSpec}`` (stacked like the kernel under
      ``nn.scan``), excluding DoRA's magnitude.
    shared: leaves one model shares, kept under ``adapters[SHARED_KEY]`` (frozen).
    init: ``init(key, i_dim, o_dim, config, shared) -> {name: array}``: one layer's leaves.
    factors: ``factors(leaves, shared, i_dim, o_dim, config) -> (A [I, r], B [r, O], s)``
      for one layer (unstacked leaves), so that ``ΔW = s·A B``.
    init_shared: ``init_shared(key, i_max, o_max, config) -> {name: array}`` or ``None``.
  """

  name: str
  leaves: Mapping[str, LeafSpec]
  init: Callable[..., dict[str, Array]]
  factors: Callable[..., tuple[Array, Array, float]]
  shared: Mapping[str, LeafSpec] = dataclasses.field(default_factory=dict)
  init_shared: Callable[..., dict[str, Array]] | None = None

  @property
  def marker(self) -> str:
    """A leaf every adapter of this variant holds (recognizes adapter dicts)."""
    return next(iter(self.leaves))

  def leaf_spec(self, name: str) -> LeafSpec:
    if name == MAGNITUDE:
      return MAGNITUDE_SPEC
    return {**self.leaves, **self.shared}[name]


MAGNITUDE_SPEC = LeafSpec(("out",), trainable=True, decay=False)
"""Decaying the magnitude would pull it to 0, away from the base norm it starts at."""


def config_variant(config: Any) -> Variant:
  """The variant of an adapter config (``config.variant``)."""
  variant = getattr(config, "variant", None)
  if not isinstance(variant, Variant):
    raise TypeError(f"Expected an adapter config (LoraConfig, VeraConfig), got {type(config).__name__}.")
  return variant


def module_config(config: Any, path: str) -> Any:
  """The config of the module at ``path``: ``config.for_module(path)`` where the config has
  per-module fields (LoRA's ``rank_pattern`` / ``alpha_pattern``), else ``config``."""
  for_module = getattr(config, "for_module", None)
  return config if for_module is None else for_module(path)
