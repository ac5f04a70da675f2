"""Adapters trained on a residual base (PiSSA, OLoRA) as a LoRA for the original base.

PiSSA and OLoRA (:func:`dora_jax.init_adapters_and_base`) train ``A``, ``B`` on
``W_res = W0 − s·A0 B0``. With the initial factors kept, the trained adapter is also a
plain LoRA of rank ``2r`` on the original ``W0`` (PEFT's ``subtract_mutated_init``,
``peft/tuners/lora/model.py``, used by ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``)::

    W_res + s·A B = W0 + s·(A B − A0 B0) = W0 + s·[A | A0] [B ; −B0]

with ``r`` and ``lora_alpha`` doubled so that ``s`` is unchanged (rsLoRA:
``lora_alpha·√2``), as are the values of ``rank_pattern`` / ``alpha_pattern`` (PEFT
refuses rsLoRA with patterns here; so do we). A DoRA adapter keeps its magnitude: the
direction ``V = W_res + s·A B`` is the same matrix, so ``W'`` is unchanged. (PEFT's
conversion keeps only ``lora_A`` / ``lora_B``, so a converted PEFT DoRA adapter loads with
``m = ||W0||_c`` instead of the trained magnitude.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

from dora_jax import variants
from dora_jax.tree import flatten_adapters, unflatten


def converted_config(config: Any) -> Any:
  """The config of :func:`convert_to_lora`'s adapters: ``r``, ``lora_alpha`` and the pattern
  values doubled (rsLoRA: ``lora_alpha·√2``), ``init_lora_weights=True`` (as PEFT's
  ``save_pretrained`` writes it).

  Raises:
    ValueError: ``config`` does not modify the base; rsLoRA with ``rank_pattern`` /
      ``alpha_pattern`` (PEFT: "not supported").
  """
  if not getattr(config, "modifies_base", False):
    raise ValueError(
        f"Only PiSSA / OLoRA adapters (init_lora_weights 'pissa', 'pissa_niter_N', 'olora') are"
        f" trained on a residual base; this config has init_lora_weights="
        f"{getattr(config, 'init_lora_weights', None)!r}: export it without initial_adapters.")
  if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
    raise ValueError(
        "Converting to a LoRA for the original base is not supported with use_rslora=True and"
        " rank_pattern/alpha_pattern (PEFT refuses it too: doubling r and alpha keeps s = alpha/r"
        " but not alpha/sqrt(r) per pattern). Export the merged weights instead.")
  alpha = config.lora_alpha * (math.sqrt(2.0) if config.use_rslora else 2)
  return dataclasses.replace(
      config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True,
      rank_pattern={k: 2 * v for k, v in config.rank_pattern},
      alpha_pattern={k: 2 * v for k, v in config.alpha_pattern})


def convert_to_lora(adapters: Mapping, initial_adapters: Mapping, config: Any) -> tuple[dict, Any]:
  """``(adapters, config)`` of rank ``2r`` for the ORIGINAL base ``W0``; see the module docstring.

  Args:
    adapters: trained LoRA/DoRA adapters (``lora_a [*stack, I, r]``, ``lora_b [*stack, r, O]``,
      optional ``magnitude [*stack, O]``) that ran on the residual params.
    initial_adapters: the adapters :func:`dora_jax.init_adapters_and_base` returned (``A0``,
      ``B0``), same paths and shapes.
    config: their :class:`~dora_jax.LoraConfig` (``init_lora_weights`` PiSSA or OLoRA).

  Returns:
    ``{path: {"lora_a": [A | A0] [*stack, I, 2r], "lora_b": [B ; −B0] [*stack, 2r, O],
    "magnitude"}}`` and :func:`converted_config`. ``merge(W0, ...)`` with them equals
    ``merge(W_res, adapters, config)``.

  Raises:
    ValueError: see :func:`converted_config`; paths or shapes of the two trees differ.
  """
  new_config = converted_config(config)
  flat, flat0 = flatten_adapters(adapters), flatten_adapters(initial_adapters)
  if sorted(flat) != sorted(flat0):
    raise ValueError(
        f"initial_adapters has modules {sorted(flat0)[:6]} but the adapters {sorted(flat)[:6]}:"
        " pass the adapters init_adapters_and_base returned for these adapters.")
  out = {}
  for path, ad in flat.items():
    ad0 = flat0[path]
    variants.check_matches_config(ad, config, path)
    for k in ("lora_a", "lora_b"):
      if ad[k].shape != ad0[k].shape:
        raise ValueError(
            f"initial_adapters['{path}']['{k}'] has shape {ad0[k].shape}, the trained one"
            f" {ad[k].shape}: pass the adapters init_adapters_and_base returned for these.")
    b0 = jnp.asarray(ad0["lora_b"]).astype(ad["lora_b"].dtype)
    conv = {"lora_a": jnp.concatenate([ad["lora_a"], jnp.asarray(ad0["lora_a"]).astype(ad["lora_a"].dtype)], -1),
            "lora_b": jnp.concatenate([ad["lora_b"], -b0], -2)}
    if variants.MAGNITUDE in ad:
      conv[variants.MAGNITUDE] = ad[variants.MAGNITUDE]
    out[path] = conv
  return unflatten(out), new_config
