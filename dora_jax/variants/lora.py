"""LoRA (Hu et al. 2021) and rsLoRA: ``ΔW = s·A B``, ``A: [I, r]``, ``B: [r, O]`` trained.

``s = lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``). Initialization as PEFT's
``LoraLayer.reset_lora_parameters``: ``A`` Kaiming-uniform (``a=sqrt(5)``, bound
``1/sqrt(I)``) or Gaussian (std ``1/r``), ``B`` zeros, so the adapted model starts equal
to the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dora_jax import core
from dora_jax.variants.base import LeafSpec, Variant


def init(key: jax.Array, i_dim: int, o_dim: int, config, shared=None) -> dict[str, jax.Array]:
  """``{"lora_a": [I, r], "lora_b": [r, O]}`` in ``config.adapter_dtype``."""
  del shared
  ka, kb = jax.random.split(key)
  dtype, r = config.adapter_dtype, config.r
  if config.init_lora_weights == "gaussian":
    a = core.gaussian_a(ka, (i_dim, r), dtype)
  else:
    a = core.kaiming_uniform_a(ka, (i_dim, r), dtype)
  if config.init_lora_weights is False:
    b = core.kaiming_uniform_a(kb, (r, o_dim), dtype)
  else:
    b = jnp.zeros((r, o_dim), dtype)
  return {"lora_a": a, "lora_b": b}


def factors(leaves, shared, i_dim: int, o_dim: int, config):
  """``(A, B, s)``: the leaves themselves and the config's scale."""
  del shared, i_dim, o_dim
  return leaves["lora_a"], leaves["lora_b"], config.scale


VARIANT = Variant(
    name="lora",
    leaves={"lora_a": LeafSpec(("in", "rank")), "lora_b": LeafSpec(("rank", "out"))},
    init=init,
    factors=factors,
)
