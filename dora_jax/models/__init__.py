"""Flax definitions of model families that load real checkpoints."""

from dora_jax.models.hf import hf_to_params, load_pretrained, params_to_hf, save_pretrained
from dora_jax.models.llama import (
    LOGICAL_AXIS_RULES,
    Llama,
    LlamaConfig,
    greedy_generate,
)
from dora_jax.models.smollm2 import convert_gguf, load_smollm2, smollm2_path

__all__ = [
    "LOGICAL_AXIS_RULES", "Llama", "LlamaConfig", "greedy_generate",
    "load_pretrained", "save_pretrained", "hf_to_params", "params_to_hf",
    "load_smollm2", "smollm2_path", "convert_gguf",
]
