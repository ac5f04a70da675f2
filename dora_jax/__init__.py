"""dora_jax: weight-decomposed low-rank adaptation (DoRA), LoRA and rsLoRA for JAX / Flax.

The core is pure functions on arrays and pytrees (:mod:`dora_jax.core`,
:mod:`dora_jax.tree`); :func:`wrap` runs a Linen model with adapters,
:mod:`dora_jax.nnx` wraps NNX modules, :mod:`dora_jax.optim` freezes the base.
"""

from dora_jax import core
from dora_jax import nnx
from dora_jax import variants
from dora_jax.config import LoraConfig, VeraConfig
from dora_jax.core import (
    column_norm,
    decompose_kernel,
    decomposition_shift,
    factored_column_norm,
    merge_kernel,
    unmerge_kernel,
)
from dora_jax.initialize import init_adapters, init_adapters_and_base
from dora_jax.linen import kernel_layouts, wrap
from dora_jax.optim import (
    adapter_labels,
    freeze_base,
    loraplus,
    loraplus_labels,
    make_train_step,
    trainable_mask,
    weight_decay_mask,
)
from dora_jax.tree import (
    KernelLayout,
    check_adapters,
    combine,
    count_params,
    decompose,
    merge,
    select_targets,
    split,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "VeraConfig", "KernelLayout", "core", "nnx", "variants",
    "init_adapters", "init_adapters_and_base", "convert_to_lora", "wrap", "merge", "unmerge", "decompose", "kernel_layouts",
    "select_targets", "check_adapters", "combine", "split", "count_params",
    "column_norm", "factored_column_norm", "merge_kernel", "unmerge_kernel",
    "decompose_kernel", "decomposition_shift",
    "adapter_labels", "trainable_mask", "weight_decay_mask", "freeze_base", "make_train_step",
    "loraplus", "loraplus_labels",
]

from dora_jax.checkpoint import (
    CheckpointMismatchError,
    load_adapters,
    params_fingerprint,
    read_adapter_info,
    save_adapters,
)
from dora_jax.residual import convert_to_lora
from dora_jax.peft_format import export_peft, import_peft, peft_module_name, peft_state_dict

__all__ += [
    "save_adapters", "load_adapters", "read_adapter_info", "CheckpointMismatchError",
    "params_fingerprint", "export_peft", "import_peft", "peft_module_name", "peft_state_dict",
]

from dora_jax import sharding
from dora_jax.sharding import (
    adapter_shardings,
    init_adapters_sharded,
    opt_state_shardings,
    param_shardings,
)

__all__ += [
    "sharding", "param_shardings", "adapter_shardings", "init_adapters_sharded", "opt_state_shardings",
]

from dora_jax import quant
from dora_jax.quant import (
    Int8Kernel,
    NF4Kernel,
    QuantizedKernel,
    check_float_kernel,
    dequantize_params,
    is_quantized,
    quantize,
    quantized_param_shardings,
)

__all__ += [
    "quant", "quantize", "dequantize_params", "is_quantized", "check_float_kernel",
    "QuantizedKernel", "NF4Kernel", "Int8Kernel", "quantized_param_shardings",
]

from dora_jax import analysis
from dora_jax.analysis import (
    decomposition_slope,
    kernel_shift,
    plot_decomposition,
    weight_decomposition,
)

__all__ += [
    "analysis", "weight_decomposition", "kernel_shift", "decomposition_slope", "plot_decomposition",
]
