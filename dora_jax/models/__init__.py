"""Flax definitions of model families that load real checkpoints, and generation with them."""

from dora_jax.models.generation import GenerateOutput, generate, init_cache, left_pad, sample_logits
from dora_jax.models.hf import hf_to_params, load_pretrained, params_to_hf, save_pretrained
from dora_jax.models.llama import (
    LOGICAL_AXIS_RULES,
    SUPPORTED_MODEL_TYPES,
    Llama,
    LlamaConfig,
    greedy_generate,
)
from dora_jax.models.smollm2 import convert_gguf, load_smollm2, smollm2_path

__all__ = [
    "LOGICAL_AXIS_RULES", "SUPPORTED_MODEL_TYPES", "Llama", "LlamaConfig", "greedy_generate",
    "generate", "GenerateOutput", "init_cache", "left_pad", "sample_logits",
    "load_pretrained", "save_pretrained", "hf_to_params", "params_to_hf",
    "load_smollm2", "smollm2_path", "convert_gguf",
]
