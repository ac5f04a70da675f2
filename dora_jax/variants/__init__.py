"""Method variants and the per-kernel math written once over their factors.

A variant (:class:`Variant`: :mod:`~dora_jax.variants.lora`, :mod:`~dora_jax.variants.vera`)
declares the leaves it adds next to a kernel and turns them into factors
``ΔW = s·A B``. The functions here compose a variant with DoRA's magnitude
(:mod:`~dora_jax.variants.dora`) for one kernel ``W0: [I, O]`` (unstacked; the tree
functions vmap them over ``nn.scan`` axes): init, output, merge, unmerge. The Linen and
NNX front-ends, the tree functions, sharding, optax labels, checkpoints and the PEFT
format all go through them, so a new method is one file here plus its config.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from dora_jax import core
from dora_jax.projection import Projection
from dora_jax.variants import dora, lora
from dora_jax.variants.base import (
    MAGNITUDE,
    MAGNITUDE_SPEC,
    SHARED_KEY,
    LeafSpec,
    Variant,
    config_variant,
    module_config,
)

Array = jax.Array

VARIANTS: dict[str, Variant] = {}
"""Registered variants by name."""


def register(variant: Variant) -> Variant:
  """Makes ``variant``'s leaves known to the tree walkers, optax labels and checkpoints."""
  VARIANTS[variant.name] = variant
  return variant


register(lora.VARIANT)


def leaf_specs() -> dict[str, LeafSpec]:
  """``{leaf name: LeafSpec}`` of every registered variant's per-layer and shared leaves."""
  out = {MAGNITUDE: MAGNITUDE_SPEC}
  for v in VARIANTS.values():
    out.update(v.leaves)
    out.update(v.shared)
  return out


def layer_leaf_names() -> frozenset[str]:
  """Names of the per-layer adapter leaves of every registered variant, plus ``magnitude``."""
  names = {MAGNITUDE}
  for v in VARIANTS.values():
    names.update(v.leaves)
  return frozenset(names)


def is_adapter(node: Any) -> bool:
  """Whether ``node`` is one layer's adapter dict (holds a registered variant's leaves)."""
  return isinstance(node, Mapping) and any(v.marker in node for v in VARIANTS.values())


def adapter_variant(adapter: Mapping, where: str = "") -> Variant:
  """The variant whose leaves ``adapter`` holds."""
  for v in VARIANTS.values():
    if v.marker in adapter:
      return v
  raise ValueError(f"The adapter{f' at {where!r}' if where else ''} has leaves {sorted(adapter)},"
                   f" which no method defines (known: {sorted(layer_leaf_names())}).")


def check_matches_config(adapter: Mapping, config: Any, where: str) -> None:
  """Raises a ``ValueError`` when an adapter was not made with ``config``'s method or DoRA switch."""
  variant = config_variant(config)
  missing = [k for k in variant.leaves if k not in adapter]
  if missing:
    raise ValueError(
        f"The adapter at '{where}' has leaves {sorted(adapter)} but the config is"
        f" {type(config).__name__} ({variant.name}), which needs {sorted(variant.leaves)}:"
        " pass the config the adapters were made with.")
  has_m = MAGNITUDE in adapter
  if has_m != bool(config.use_dora):
    raise ValueError(
        f"The adapter at '{where}' {'has' if has_m else 'lacks'} a DoRA magnitude but the config"
        f" says use_dora={config.use_dora}: use the config the adapters were made (or saved) with.")


def factors(config: Any, adapter: Mapping, shared: Mapping | None, i_dim: int, o_dim: int):
  """``(A [I, r], B [r, O], s)`` of one layer's adapter: ``ΔW = s·A B``."""
  return config_variant(config).factors(adapter, shared or {}, i_dim, o_dim, config)


def init_adapter(key: Array, w_mat: Array, config: Any, shared: Mapping | None = None,
                 w0_norm_sq: Array | None = None) -> dict[str, Array]:
  """One layer's adapter for ``W0 = w_mat [I, O]``: the variant's leaves and, for DoRA,
  ``magnitude = ||W0 + ΔW||_c`` (``= ||W0||_c`` with the default init)."""
  i_dim, o_dim = w_mat.shape
  leaves = config_variant(config).init(key, i_dim, o_dim, config, shared or {})
  if config.use_dora:
    a, b, s = factors(config, leaves, shared, i_dim, o_dim)
    leaves[MAGNITUDE] = dora.init_magnitude(w_mat, a, b, s, w0_norm_sq).astype(config.adapter_dtype)
  return leaves


def init_adapter_and_base(key: Array, w_mat: Array, config: Any) -> tuple[dict[str, Array], Array]:
  """``(adapter, W_res)`` for an init that moves ``s·A0 B0`` out of ``W0 = w_mat [I, O]``
  (LoRA's PiSSA / OLoRA, :func:`lora.init_from_weight`); DoRA's
  ``magnitude = ||W_res + s·A0 B0||_c`` (``= ||W0||_c`` up to rounding), as PEFT's DoRA
  init takes the norm of the already-modified base plus the LoRA product."""
  if config_variant(config) is not lora.VARIANT:
    raise ValueError(f"{type(config).__name__} has no base-modifying init.")
  leaves, w_res = lora.init_from_weight(key, w_mat, config)
  if config.use_dora:
    a, b, s = factors(config, leaves, None, *w_mat.shape)
    leaves[MAGNITUDE] = dora.init_magnitude(w_res, a, b, s).astype(config.adapter_dtype)
  return leaves, w_res


def merge_kernel(w_mat: Array, adapter: Mapping, config: Any,
                 shared: Mapping | None = None) -> tuple[Array, Array]:
  """``(W', ||W0 + ΔW||_c)``: the merged kernel ``[I, O]`` in ``w_mat``'s dtype and the
  norm at merge time ``[O]`` float32 (:func:`unmerge_kernel` needs it for DoRA)."""
  a, b, s = factors(config, adapter, shared, *w_mat.shape)
  return core.merge_kernel(w_mat, a, b, s, adapter.get(MAGNITUDE), return_norm=True)


def unmerge_kernel(w_merged: Array, adapter: Mapping, config: Any, shared: Mapping | None = None,
                   norm: Array | None = None) -> Array:
  """Inverse of :func:`merge_kernel`: ``W0 [I, O]`` (DoRA needs the merge-time ``norm``)."""
  a, b, s = factors(config, adapter, shared, *w_merged.shape)
  return core.unmerge_kernel(w_merged, a, b, s, adapter.get(MAGNITUDE), norm)


def output(proj: Projection, y0: Array, x_in: Array, w_mat: Array, adapter: Mapping, config: Any,
           *, shared: Mapping | None = None, bias: Array | None = None, dropped: bool = False,
           path: str = dora.DEFAULT_PATH, w0_norm_sq: Array | None = None,
           w_is_stored: bool = False) -> Array:
  """The adapted output of one layer from its base output ``y0``; see :func:`dora.output`."""
  a, b, s = factors(config, adapter, shared, proj.i_dim, proj.o_dim)
  return dora.output(proj, y0, x_in, w_mat, a, b, s, adapter.get(MAGNITUDE), bias, dropped,
                     path, w0_norm_sq, w_is_stored)


__all__ = [
    "Variant", "LeafSpec", "SHARED_KEY", "MAGNITUDE", "VARIANTS", "register", "leaf_specs",
    "layer_leaf_names", "is_adapter", "adapter_variant", "check_matches_config", "factors",
    "init_adapter", "init_adapter_and_base", "merge_kernel", "unmerge_kernel", "output", "config_variant", "module_config",
    "dora", "lora",
]
