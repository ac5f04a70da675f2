"""HF PEFT's on-disk adapter format: export and import.

:func:`export_peft` / :func:`import_peft` write and read ``adapter_config.json`` +
``adapter_model.safetensors``, the folder that ``peft.PeftModel.from_pretrained``
(and vLLM, for LoRA) load: LoRA and DoRA on Linear, Embedding and Conv 1-D/2-D/3-D
layers, and VeRA on Linear layers. The tensor layouts per layer type are in
:mod:`dora_jax.peft_tensors`, ``adapter_config.json`` in :mod:`dora_jax.peft_config`.

Keys (checked against ``peft`` 0.21 ``save_pretrained`` output and
``peft/utils/save_and_load.py``), for a module named ``<name>`` in the HF model:
``base_model.model.<name>.lora_A.weight`` / ``lora_B.weight`` (Linear, Conv),
``.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding), ``.lora_magnitude_vector``
(DoRA), ``.vera_lambda_d`` / ``.vera_lambda_b`` (VeRA), and VeRA's shared
``base_model.vera_A`` / ``base_model.vera_B``.

(PEFT keeps DoRA's magnitude in a ``DoraLinearLayer`` whose parameter is
``lora_magnitude_vector.<adapter>.weight``; ``get_peft_model_state_dict`` strips the
``.weight`` and the adapter name when saving, and ``set_peft_model_state_dict``
puts them back.)

Not exported (refused with a message): DVoRA (PEFT has no DVoRA), grouped convs (PEFT's
grouped-conv LoRA is another parameterization), other layer kinds, VeRA on non-Linear
layers, and DoRA on an embedding that is also the LM head. A LoRA on a tied embedding is
exported with PEFT's ``ensure_weight_tying`` (see :func:`export_peft`, ``tied_embeddings``).

Layout: this module only re-exports. Writing is in :mod:`dora_jax.peft_export`, reading in
:mod:`dora_jax.peft_import`, the file and module names in :mod:`dora_jax.peft_names`.
"""

from __future__ import annotations

# Pure re-exports: the format in one namespace, its code by concern.
from dora_jax.peft_names import (  # noqa: F401
    PEFT_CONFIG_NAME,
    PEFT_PREFIX,
    PEFT_WEIGHTS_NAME,
    ModuleNameMap,
    peft_module_name,
)
from dora_jax.peft_export import (  # noqa: F401
    _DVORA_MESSAGE,
    _EMBED_HINT,
    _export_kinds,
    _tied_embedding_paths,
    export_peft,
    peft_state_dict,
    tied_dora_message,
)
from dora_jax.peft_import import (  # noqa: F401
    _check_finite,
    _listed_without_tensors,
    _name_candidates,
    _pattern_rank,
    import_peft,
)

__all__ = [
    "ModuleNameMap",
    "export_peft",
    "import_peft",
    "peft_module_name",
    "peft_state_dict",
]
