"""QLoRA / QDoRA for NNX models: linear modules whose kernel is a quantized pytree.

:func:`quantize` replaces each selected ``nnx.Linear`` / ``nnx.LinearGeneral`` /
``nnx.Einsum`` by a :class:`QuantizedLinear` / :class:`QuantizedLinearGeneral` /
:class:`QuantizedEinsum`: the same module (a subclass, so every ``isinstance`` check and
state path stays) whose ``kernel`` ``nnx.Param`` holds an :class:`~dora_jax.quant.NF4Kernel`
or :class:`~dora_jax.quant.Int8Kernel` (:mod:`dora_jax.quant`'s numerics). Its
``__call__`` dequantizes the kernel for that call only, under ``jax.checkpoint`` with
nothing saved, so the backward re-dequantizes ``W0`` for ``∇x`` instead of keeping a
full-precision copy of every layer (as :func:`dora_jax.wrap` does for Linen, and QLoRA's
backward)::

    model = dora_jax.nnx.quantize(model, method="nf4")            # all-linear but lm_head
    model = dora_jax.nnx.apply_adapters(model, config, nnx.Rngs(0))  # QDoRA: m from dequantized W0
    model = dora_jax.nnx.merge_adapters(model)                     # plain modules, float W'

:func:`dora_jax.nnx.apply_adapters` then wraps them like any linear module: ``y0`` comes
from the quantized module's own call, and DoRA's norm and magnitude use the dequantized
``W0`` (PEFT's QDoRA semantics). :func:`dequantize` turns them back into plain modules.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx

from dora_jax import quant
from dora_jax.config import LoraConfig
from dora_jax.projection import einsum_kernel_axes


def _dequantized_call(self, inputs, *args, **kwargs):
  """The base type's ``__call__`` on the dequantized kernel, under ``jax.checkpoint`` with
  nothing saved (the backward re-dequantizes ``W0``)."""
  graphdef, state = nnx.split(self)
  base_call = self.base_type.__call__

  def run(state, inputs):
    module = nnx.merge(graphdef, state)  # a copy at this trace level
    module.kernel.set_value(quant.dequantize(module.kernel.get_value()))
    return base_call(module, inputs, *args, **kwargs)

  return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(state, inputs)


# Direct subclasses (no mixin), so a copy can switch between a type and its quantized one.
class QuantizedLinear(nnx.Linear):
  """An ``nnx.Linear`` whose ``kernel`` holds a :class:`~dora_jax.quant.QuantizedKernel`; its
  call runs ``nnx.Linear.__call__`` on the dequantized kernel (``base_type``)."""

  base_type = nnx.Linear
  __call__ = _dequantized_call


class QuantizedLinearGeneral(nnx.LinearGeneral):
  """An ``nnx.LinearGeneral`` whose ``kernel`` holds a quantized kernel."""

  base_type = nnx.LinearGeneral
  __call__ = _dequantized_call


class QuantizedEinsum(nnx.Einsum):
  """An ``nnx.Einsum`` whose ``kernel`` holds a quantized kernel."""

  base_type = nnx.Einsum
  __call__ = _dequantized_call


_QUANTIZED_TYPES = ((nnx.Einsum, QuantizedEinsum), (nnx.LinearGeneral, QuantizedLinearGeneral),
                    (nnx.Linear, QuantizedLinear))


def is_quantized_module(module: Any) -> bool:
  """Whether ``module`` is one of this module's quantized linear modules."""
  return isinstance(module, (QuantizedLinear, QuantizedLinearGeneral, QuantizedEinsum))


def _quantize_kernel(module: nnx.Module, path: str, method: str, block_size: int | None,
                     double_quant: bool) -> quant.QuantizedKernel:
  w = module.kernel.get_value()
  quant.check_float_kernel(w, f"{path}/kernel")
  if method == "nf4":
    return quant.quantize_nf4(w, block_size=block_size or 64, double_quant=double_quant)
  if isinstance(module, nnx.Einsum):
    rhs, ins, outs = einsum_kernel_axes(module.einsum_str)
    if rhs != ins + outs:
      raise ValueError(
          f"quantize: the nnx.Einsum at '{path}' ('{module.einsum_str}') has kernel axes that are"
          " not ordered inputs-then-outputs, which int8's per-output-channel scales need; use"
          " method='nf4' or exclude it (exclude_modules).")
    inputs = len(ins)
  elif isinstance(module, nnx.LinearGeneral):
    inputs = len(module.in_features)
  else:
    inputs = 1
  return quant.quantize_int8(w, inputs=inputs, block_size=block_size)


def quantized_copy(module: nnx.Module, qk: quant.QuantizedKernel) -> nnx.Module:
  """A copy of a linear module as its quantized type, holding ``qk`` as its ``kernel``."""
  new = nnx.clone(module)
  new.__class__ = next(q for t, q in _QUANTIZED_TYPES if isinstance(module, t))
  new.kernel.set_value(qk)
  return new


def plain_copy(module: nnx.Module, kernel: Any = None) -> nnx.Module:
  """A copy of a quantized module as its plain type, with ``kernel`` (default: the
  dequantized kernel, in the original kernel's dtype)."""
  new = nnx.clone(module)
  if is_quantized_module(new):
    new.__class__ = new.base_type
  if kernel is None:
    kernel = quant.dequantize(new.kernel.get_value())
  new.kernel.set_value(kernel)
  return new


def quantize(model: nnx.Module, *, method: str = "nf4",
             target_modules: Sequence[str] | str | None = None,
             exclude_modules: Sequence[str] | str | None = None,
             block_size: int | None = None, double_quant: bool = True) -> nnx.Module:
  """Replaces the selected linear modules of an NNX model by quantized ones, in place.

  Args:
    model: an NNX model without adapters (quantize first: QDoRA's magnitude starts from
      the dequantized kernel).
    method: ``"nf4"`` (QLoRA, blocks of 64 over the flattened kernel, double
      quantization) or ``"int8"`` (absmax per output channel).
    target_modules: as :class:`dora_jax.LoraConfig`'s; None means ``"all-linear"``: every
      ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` but ``lm_head`` (bitsandbytes keeps
      the output layer in full precision).
    exclude_modules: as :class:`dora_jax.LoraConfig`'s.
    block_size: NF4 block (default 64) or int8 input block (default None: per channel).
    double_quant: NF4 double quantization of the absmax values.

  Returns:
    ``model`` (a new object if the root module itself is quantized).

  Raises:
    ValueError: unknown method; a selected module that is not linear, already quantized or
      already adapted; a non-float kernel; an ``nnx.LinearGeneral`` with ``batch_axis``;
      int8 on an Einsum whose kernel axes are not inputs-then-outputs.
  """
  from dora_jax import nnx as dnnx  # pylint: disable=g-import-not-at-top  (imports this module)

  if method not in quant.METHODS:
    raise ValueError(f"quantize: method={method!r} is not one of {quant.METHODS}.")
  config = LoraConfig(target_modules="all-linear" if target_modules is None else target_modules,
                      exclude_modules=exclude_modules)
  chosen = dnnx.select_modules(model, config)
  for p, m in chosen:
    where = dnnx._path_str(p) or "<root>"  # pylint: disable=protected-access
    if isinstance(m, dnnx.AdaptedLinear):
      raise ValueError(f"quantize: the module at '{where}' already has adapters; quantize the"
                       " model first, then apply_adapters (QDoRA's magnitude is the dequantized"
                       " kernel's column norm).")
    if is_quantized_module(m):
      raise ValueError(f"quantize: the module at '{where}' is already quantized.")
    if not isinstance(m, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
      raise ValueError(f"quantize: the module at '{where}' is a {type(m).__name__}; dora_jax.nnx"
                       " quantizes nnx.Linear, nnx.LinearGeneral and nnx.Einsum. Exclude it"
                       " (exclude_modules).")
    if isinstance(m, nnx.LinearGeneral) and m.batch_axis:
      raise ValueError(f"quantize: the nnx.LinearGeneral at '{where}' has batch_axis; one kernel"
                       " per batch index is not supported. Exclude it (exclude_modules).")
  for p, m in chosen:
    qk = _quantize_kernel(m, dnnx._path_str(p), method, block_size, double_quant)  # pylint: disable=protected-access
    model = dnnx._replace(model, p, quantized_copy(m, qk))  # pylint: disable=protected-access
  return model


def dequantize(model: nnx.Module) -> nnx.Module:
  """Replaces every quantized module (also inside adapter wrappers) by its plain type with the
  dequantized kernel, in place; returns ``model`` (a new object if the root was quantized)."""
  from dora_jax import nnx as dnnx  # pylint: disable=g-import-not-at-top

  found = [(p, m) for p, m in nnx.iter_modules(model) if is_quantized_module(m)]
  for p, m in sorted(found, key=lambda pm: -len(pm[0])):
    model = dnnx._replace(model, p, plain_copy(m))  # pylint: disable=protected-access
  return model
