"""Flax definitions of model families that load real checkpoints."""

from dora_jax.models.llama import (
    LOGICAL_AXIS_RULES,
    Llama,
    LlamaConfig,
    greedy_generate,
)

__all__ = ["LOGICAL_AXIS_RULES", "Llama", "LlamaConfig", "greedy_generate"]
