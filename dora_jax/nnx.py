"""Adapters for Flax NNX models: module wrapping and a functional route over state.

Module route (train in place, NNX style)::

    model = dora_jax.nnx.apply_adapters(model, config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=dora_jax.nnx.Adapter)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, dora_jax.nnx.Adapter))(model, x, y)
    optimizer.update(model, grads)
    model = dora_jax.nnx.merge_adapters(model)   # plain nnx.Linear / ... with W'

:func:`apply_adapters` replaces each targeted ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Einsum``, ``nnx.Conv`` (ungrouped) and ``nnx.Embed`` by an :class:`AdaptedLinear` that keeps the original module as
``base_layer`` (its ``kernel`` and ``bias`` stay ``nnx.Param``) and holds
``lora_a [I, r]``, ``lora_b [r, O]`` and, for DoRA, ``magnitude [O]`` as
:class:`Adapter` variables: ``nnx.state(model, Adapter)`` and
``nnx.Optimizer(..., wrt=Adapter)`` see the adapters only. The forward is the
factored one of :mod:`dora_jax.linen` (PEFT semantics, ``W'`` never formed):

    LoRA:  y = y0 + s·(drop(x) A) B
    DoRA:  y = y0 + (g − 1) ⊙ (x' W0) + g ⊙ s·(drop(x) A) B,  g = m / sg(||W0 + sAB||_c)

with ``y0`` from the base module's own ``__call__`` and ``x' W0 = y0 − b`` without
dropout (the bias is never rescaled). The adapter dropout is an ``nnx.Dropout``
(rng stream ``'dropout'``), switched by ``model.train()`` / ``model.eval()`` /
``nnx.view(model, deterministic=...)``.

Functional route (the merged fallback, any NNX model)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapters = dora_jax.init_adapters(key, param_dict(params), config,
                                      layouts=kernel_layouts(model))
    y = functional_apply(graphdef, (params, rest), adapters, config, x)

:func:`param_dict` gives the ``Param`` state as the nested ``{str: ...}`` dict that
:func:`dora_jax.init_adapters`, :func:`dora_jax.merge` and :func:`dora_jax.decompose`
take; :func:`merged_state` folds adapters into an ``nnx.State``.

QLoRA / QDoRA: :func:`quantize` (from :mod:`dora_jax.nnx_quant`) turns the linear modules
into quantized ones before :func:`apply_adapters`; their kernels are dequantized inside
each call and :func:`merge_adapters` returns full-precision ``W'``.

Layout: this module walks and edits the module graph (selection, wrap, merge); the wrapper
and the kernel-as-matrix view are in :mod:`dora_jax.nnx_layer`, the functional route in
:mod:`dora_jax.nnx_functional`, the quantized modules in :mod:`dora_jax.nnx_quant`. Every
public name of those is importable from here.
"""

from __future__ import annotations

import collections.abc
from typing import Any

from flax import nnx

from dora_jax._logging import _said  # noqa: F401  (tests clear it to see a notice again)
from dora_jax import tree as tree_lib
from dora_jax import variants
from dora_jax.variants import dora

# The adapter layer (dora_jax.nnx_layer) and the functional route (dora_jax.nnx_functional),
# re-exported: dora_jax.nnx is the one public namespace of the NNX front-end.
from dora_jax.nnx_layer import (  # noqa: F401
    SUPPORTED_TYPES,
    Adapter,
    AdaptedLinear,
    BaseNorm,
    FrozenAdapter,
    _check_init,
    _init_matrix_adapters,
    _path_str,
    _weight,
    check_supported,
    conv_fn,
    kernel_from_matrix,
    kernel_matrix,
    wrappers,
)
from dora_jax.nnx_functional import (  # noqa: F401
    _str_keys,
    functional_apply,
    kernel_layouts,
    merged_state,
    param_dict,
)

_LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


# ---------------------------------------------------------------------------
# Walking and editing the module graph


def _child(node: Any, key: Any) -> Any:
  if isinstance(node, (collections.abc.Mapping, collections.abc.Sequence)):
    return node[key]
  return getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
  if isinstance(node, (collections.abc.MutableMapping, collections.abc.MutableSequence)):
    node[key] = value
  elif isinstance(node, (collections.abc.Mapping, collections.abc.Sequence)):
    raise ValueError(f"Cannot replace entry {key!r} of an immutable {type(node).__name__}.")
  else:
    setattr(node, key, value)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> nnx.Module:
  """Puts ``new`` at ``path`` in place; returns the (possibly new) root."""
  if not path:
    return new
  node = model
  for k in path[:-1]:
    node = _child(node, k)
  _set_child(node, path[-1], new)
  return model


def _has_weight(module: Any) -> bool:
  return any(isinstance(getattr(module, k, None), nnx.Variable) for k in tree_lib.WEIGHT_KEYS)


def _candidates(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """Modules with a kernel or embedding, and wrappers; never what is inside a wrapper."""
  mods = list(nnx.iter_modules(model))
  wrapped = [p for p, m in mods if isinstance(m, AdaptedLinear)]
  inside = lambda p: any(len(p) > len(w) and p[: len(w)] == w for w in wrapped)
  return [(p, m) for p, m in mods
          if (isinstance(m, AdaptedLinear) or _has_weight(m)) and not inside(p)]


def _kind(module: Any) -> str:
  if isinstance(module, AdaptedLinear):
    return "adapted"  # "all-linear" skips it; naming it explicitly is an error (check_supported)
  if isinstance(module, _LINEAR_TYPES):
    return "linear"
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    return "conv"
  return "embed" if isinstance(module, nnx.Embed) else "other"


def select_modules(model: nnx.Module, config: Any) -> list[tuple[tuple, nnx.Module]]:
  """``(path, module)`` of the modules ``config`` targets: :func:`dora_jax.tree.select_paths`,
  the rule the Linen front-end uses, on the paths ``layers/0/q_proj`` (attribute names and
  list indices). ``"all-linear"`` takes every ``nnx.Linear``/``LinearGeneral``/``Einsum``
  but an ``lm_head``.

  Raises:
    ValueError: if nothing (or a listed name) matches, with the module paths / near matches.
  """
  cands = _candidates(model)
  by_path = {_path_str(p): (p, m) for p, m in cands}
  chosen = tree_lib.select_paths(
      [(_path_str(p), _kind(m), type(m).__name__) for p, m in cands], config)
  return [by_path[c] for c in chosen]


def model_deterministic(model: nnx.Module) -> bool | None:
  """The host model's train/eval mode, as ``model.train()`` / ``model.eval()`` set it.

  ``True`` (eval) when every submodule with a boolean ``deterministic`` or
  ``use_running_average`` attribute (``nnx.Dropout``, ``nnx.BatchNorm``,
  ``nnx.MultiHeadAttention``, ...) has it ``True``; ``False`` when any has it ``False``;
  ``None`` when the model has no such module (its mode leaves no trace).
  """
  flags = []
  for _, m in nnx.iter_modules(model):
    for attr in ("deterministic", "use_running_average"):
      v = getattr(m, attr, None)
      if isinstance(v, bool):
        flags.append(v)
  return all(flags) if flags else None


def apply_adapters(
    model: nnx.Module, config: Any, rngs: nnx.Rngs, *, deterministic: bool | None = None,
    dora_path: str = dora.DEFAULT_PATH,
) -> nnx.Module:
  """Wraps every module ``config`` targets in an :class:`AdaptedLinear`, in place.

  Args:
    model: an NNX model.
    config: what to adapt and how (:class:`~dora_jax.LoraConfig`, :class:`~dora_jax.VeraConfig`).
    rngs: ``rngs.params()`` draws one key ``k``; the adapters equal
      ``dora_jax.init_adapters(k, param_dict(model), config, layouts=kernel_layouts(model))``.
      The adapter dropouts fork ``rngs['dropout']``.
    deterministic: initial mode of the adapter dropouts; ``None`` (default) follows the
      model (:func:`model_deterministic`: a model put in ``eval()`` gets deterministic
      adapter dropouts; one without any mode-carrying module gets NNX's default, active).
      Afterwards ``model.train()`` / ``model.eval()`` switch them with the model's own.
      PiSSA / OLoRA inits (``config.modifies_base``) replace each targeted kernel by the
      residual ``W0 − s·A0 B0`` in place, as PEFT's ``get_peft_model`` does; keep
      :func:`adapter_dict` right after this call to export a LoRA for the original base
      (:func:`dora_jax.export_peft` ``initial_adapters=``).
    dora_path: how DoRA layers run (:mod:`dora_jax.variants.dora`; default the lean
      ``"custom_vjp"``), as in :func:`dora_jax.wrap`.

  Returns:
    ``model`` (the wrapper itself if the root module is targeted).

  Raises:
    ValueError: nothing matches (the message lists the paths); a targeted module is
      not an ``nnx.Linear``/``LinearGeneral``/``Einsum`` (the message names its type)
      or is already adapted; ``r`` exceeds what a kernel allows.
  """
  chosen = select_modules(model, config)
  for p, m in chosen:
    check_supported(m, _path_str(p))
    _check_init(m, config, _path_str(p))
  if deterministic is None:
    deterministic = bool(model_deterministic(model))
  key = rngs.params()
  made = _init_matrix_adapters(key, {_path_str(p): kernel_matrix(m) for p, m in chosen}, config)
  shared = {k: FrozenAdapter(v) for k, v in made[variants.SHARED_KEY].items()}
  for p, m in chosen:
    if _path_str(p) in made["residual"]:  # PiSSA / OLoRA rewrite the base kernel, as PEFT does
      _weight(m)[...] = kernel_from_matrix(m, made["residual"][_path_str(p)])
    wrapper = AdaptedLinear(m, variants.module_config(config, _path_str(p)), rngs=rngs, adapter=made[_path_str(p)], shared=shared,
                            deterministic=deterministic, dora_path=dora_path)
    model = _replace(model, p, wrapper)
  return model


def merge_adapters(model: nnx.Module) -> nnx.Module:
  """Replaces each :class:`AdaptedLinear` by a copy of its base module holding ``W'``, in place.

  The result has the structure (and state paths) of the model before
  :func:`apply_adapters`: export it, or run it without dora_jax. A quantized base module
  (:func:`quantize`) becomes its plain type with the full-precision ``W'``.

  Returns:
    ``model`` (a new object if the root itself was a wrapper).
  """
  from dora_jax import nnx_quant  # pylint: disable=g-import-not-at-top  (imports this module)

  for p, w in wrappers(model):
    if nnx_quant.is_quantized_module(w.base_layer):  # QLoRA / QDoRA: W' in full precision
      merged = nnx_quant.plain_copy(w.base_layer, kernel=w.merged_kernel())
    else:
      merged = nnx.clone(w.base_layer)
      _weight(merged)[...] = w.merged_kernel()
    model = _replace(model, p, merged)
  return model


def adapter_state(model: nnx.Module) -> nnx.State:
  """``nnx.state(model, Adapter)``: the adapters only, as an ``nnx.State``."""
  return nnx.state(model, Adapter)


def adapter_dict(model: nnx.Module) -> dict:
  """The adapters as the nested ``{str: ...}`` dict of :func:`dora_jax.init_adapters`.

  ``{path: {"lora_a", "lora_b"[, "magnitude"]}}`` at each wrapper's path (and the
  shared leaves under ``"shared"``), ready for :func:`dora_jax.merge` on
  :func:`param_dict` or for checkpointing.
  """
  out = {}
  shared = {}
  for p, w in wrappers(model):
    out[_path_str(p)] = w.adapter()
    shared.update({k: getattr(w, k)[...] for k in w.shared_names})
  out = tree_lib.unflatten(out) if "" not in out else out[""]
  if shared:
    out[variants.SHARED_KEY] = shared
  return out


# QLoRA / QDoRA: quantized linear modules (defined in dora_jax.nnx_quant, which imports this module).
from dora_jax.nnx_quant import (  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
    QuantizedEinsum,
    QuantizedLinear,
    QuantizedLinearGeneral,
    dequantize,
    is_quantized_module,
    quantize,
)
