"""The functional route over ``nnx.split`` state: the merged fallback for any NNX model.

Part of :mod:`dora_jax.nnx` (which re-exports every name here)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapters = dora_jax.init_adapters(key, param_dict(params), config,
                                      layouts=kernel_layouts(model))
    y = functional_apply(graphdef, (params, rest), adapters, config, x)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx

from dora_jax import tree as tree_lib
from dora_jax.config import LoraConfig
from dora_jax.nnx_layer import AdaptedLinear, _path_str, wrappers
from dora_jax.projection import einsum_kernel_axes


def _str_keys(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def param_dict(model_or_state: nnx.Module | nnx.State) -> dict:
  """The ``nnx.Param`` values as a nested dict with ``str`` keys (list indices too).

  This is the params tree :func:`dora_jax.init_adapters`, :func:`dora_jax.merge`,
  :func:`dora_jax.unmerge` and :func:`dora_jax.decompose` take. Given a model with
  wrappers, each ``base_layer`` is lifted to its wrapper's path: the result has the
  layout of the unwrapped model.
  """
  if isinstance(model_or_state, nnx.Module):
    lifted = {_path_str(p) for p, _ in wrappers(model_or_state)}
    flat = {}
    for path, value in nnx.to_flat_state(nnx.state(model_or_state, nnx.Param)):
      keys = [str(k) for k in path]
      for i in range(len(keys) - 1, 0, -1):  # drop 'base_layer' right below a wrapper
        if keys[i] == "base_layer" and "/".join(keys[:i]) in lifted:
          del keys[i]
      flat["/".join(keys)] = value.get_value()
    return tree_lib.unflatten(flat)
  return _str_keys(nnx.to_pure_dict(nnx.filter_state(model_or_state, nnx.Param)))


def kernel_layouts(model: nnx.Module) -> dict[str, tree_lib.KernelLayout]:
  """``{path: KernelLayout}`` of the model's ``nnx.LinearGeneral`` and ``nnx.Einsum`` kernels.

  Pass to :func:`dora_jax.init_adapters` / :func:`dora_jax.decompose` with
  :func:`param_dict`. A ``LinearGeneral``'s ``batch_axis`` are stacked axes.
  Einsum kernels whose axes are not ``[inputs..., outputs...]`` have no reshape
  layout and are left out (the module route handles them).
  """
  out = {}
  for p, m in nnx.iter_modules(model):
    if isinstance(m, AdaptedLinear):
      m = m.base_layer
    if isinstance(m, nnx.LinearGeneral):
      out[_path_str(p)] = tree_lib.KernelLayout(len(m.batch_axis), len(m.in_features))
    elif isinstance(m, nnx.Einsum):
      try:
        rhs, ins, outs = einsum_kernel_axes(m.einsum_str)
      except ValueError:
        continue
      if rhs == ins + outs:
        out[_path_str(p)] = tree_lib.KernelLayout(0, len(ins))
    elif isinstance(m, nnx.Linear):
      out[_path_str(p)] = tree_lib.KernelLayout(0, 1)
    elif isinstance(m, nnx.Conv):
      out[_path_str(p)] = tree_lib.KernelLayout(0, m.kernel.ndim - 1, kind="conv")
  return out


def merged_state(state: nnx.State, adapters: Mapping, config: LoraConfig) -> nnx.State:
  """A copy of ``state`` with each adapted kernel replaced by ``W'`` (:func:`dora_jax.merge`).

  Args:
    state: from ``nnx.split(model)`` (or ``nnx.split(model, nnx.Param, ...)``) of the
      unwrapped model; other variables pass through.
    adapters: ``{path: {"lora_a", "lora_b"[, "magnitude"]}}`` with ``str`` paths,
      e.g. from :func:`dora_jax.init_adapters` on :func:`param_dict` or :func:`adapter_dict`.
    config: the adapter config.
  """
  merged = tree_lib.merge(param_dict(state), adapters, config)
  updates = {}
  for path in tree_lib.flatten_adapters(adapters):
    module = tree_lib.get_path(merged, path)
    key = tree_lib.weight_key(module)
    updates[f"{path}/{key}" if path else key] = module[key]
  out = jax.tree.map(lambda v: v, state)
  nnx.replace_by_pure_dict(out, tree_lib.unflatten(updates))
  return out


def functional_apply(graphdef: nnx.GraphDef, state: nnx.State | Sequence[nnx.State],
                     adapters: Mapping, config: LoraConfig, *args, **kwargs) -> Any:
  """Calls the model rebuilt from ``graphdef`` and the merged state: the merged route.

  ``state`` is one ``nnx.State`` or the tuple of states from ``nnx.split``; the
  adapters are merged into the first. Pure (usable under ``jax.jit`` / ``jax.grad``
  w.r.t. ``adapters``); changes the call makes to the module's state (rng counts,
  batch statistics) are dropped.
  """
  states = tuple(state) if isinstance(state, (tuple, list)) else (state,)
  module = nnx.merge(graphdef, merged_state(states[0], adapters, config), *states[1:])
  return module(*args, **kwargs)
