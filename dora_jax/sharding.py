"""Shardings of base params, adapters and optimizer state, derived from logical axis names.

The base params are sharded from their Flax logical axis names
(``nn.with_logical_partitioning``) through logical-axis rules the caller gives: the
``rules`` argument, or Flax's context (``with nn.logical_axis_rules(rules):``). The
library has no default: the rules belong to the model (for the bundled Llama,
:data:`dora_jax.models.llama.LOGICAL_AXIS_RULES`: ``embed → fsdp``,
``heads``/``kv_heads``/``mlp``/``vocab`` → ``tensor``, ``batch → (data, fsdp)``).
Each adapter is sharded like the kernel it sits on (:func:`adapter_shardings`): for a
kernel ``[*stack, *in, *out]`` with spec ``P(*stack_s, *in_s, *out_s)``,

    lora_a    [*stack, I, r]   P(*stack_s, in_s[0], None)
    lora_b    [*stack, r, O]   P(*stack_s, None, out_s[0])
    magnitude [*stack, O]      P(*stack_s, out_s[0])

The rank axis is never sharded. When several kernel axes flatten into ``I`` (or
``O``) only the first one's spec carries over: sharding the leading axis of a
row-major flattening keeps each shard contiguous; a later axis does not, so a
group whose first axis is unsharded is replicated.

What the DoRA factored forward communicates with sharded kernels
-----------------------------------------------------------------
Per adapted layer (``W0: [I, O]``, ``x: [tokens, I]``, rank ``r``; see
:mod:`dora_jax.factored`), with the specs above, XLA's SPMD partitioner needs no full
kernel on any device:

- Output-sharded kernels (``q/k/v/gate/up_proj``: ``O`` on ``tensor``, Megatron
  column-parallel): ``AᵀW0`` ``[r, O]``, ``||W0||²_c`` ``[O]``, ``m``, ``B`` and ``g = m/n``
  are all sharded like ``O``: the norm needs no communication; ``xA`` ``[tokens, r]`` is
  local when ``I`` is not sharded.
- Input-sharded kernels (``o/down_proj``: ``I`` on ``tensor``, row-parallel; and every
  kernel whose ``I`` is on ``fsdp``): ``AᵀW0`` ``[r, O]``, ``||W0||²_c`` ``[O]`` and ``AᵀA``
  ``[r, r]`` are partial sums over the input shards and are all-reduced (``r·O + O + r²``
  floats per layer, nothing next to the ``I·O`` kernel; ``||W0||²_c`` is constant and can
  be cached, see ``w0_norm_sq``). ``xA`` is a partial sum over the input shards: one
  all-reduce of ``[tokens, r]``, ``r/O`` of the base matmul's own ``[tokens, O]``
  all-reduce. XLA fuses all of them into the layer's one all-reduce: the compiled
  ``data=4,tensor=2`` forward of the test model has, per row-parallel layer, a single
  all-reduce of ``(f32[r,r], f32[O], f32[r,O], f32[b,t,r], f32[b,t,O])``.
- ``g = m / n`` ``[O]`` is sharded like the outputs and scales ``y`` sharded like the
  outputs: no communication. In the backward, ``∇m`` is a sum over tokens (reduced over
  the batch axes, as every gradient is); ``∇A``, ``∇B`` follow the ``xA``, ``(xA)ᵀdy``
  products; the norm is detached, so it has no backward.
- FSDP (``embed`` on ``fsdp``) is a storage layout: XLA all-gathers a kernel's ``fsdp``
  shards before its matmul as for any FSDP model; the adapter terms add only the small
  all-reduces above. With ``data`` and ``tensor`` axes alone no all-gather produces a
  kernel in the whole train step (``tests/test_sharding.py`` checks the compiled HLO).

The model's activation constraints (``nn.with_logical_constraint``) need the rules and
the mesh in context while tracing: call jitted steps under ``jax.set_mesh(mesh)`` and
``nn.logical_axis_rules(rules)`` (the trainer's ``train.mesh.use_mesh`` does both).
Meshes from a spec string, batch placement and multi-process setup are the trainer's:
:mod:`train.mesh`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.core import meta
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax import initialize
from dora_jax import tree as tree_lib
from dora_jax import variants
from dora_jax.config import LoraConfig

Array = jax.Array
Rules = Sequence[tuple[str, Any]]
MeshAxes = None | str | tuple[str, ...]

logger = logging.getLogger("dora_jax")

_said: set[Any] = set()


def _log_once(key: Any, msg: str, *args: Any) -> None:
  if key not in _said:
    _said.add(key)
    logger.warning(msg, *args)


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------
# Base params


def _mesh_axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  return math.prod(mesh.shape[a] for a in _mesh_axes_tuple(axes))


def fit_spec(spec: Sequence[MeshAxes], shape: Sequence[int], mesh: Mesh, what: str = "array") -> P:
  """``spec`` padded to ``len(shape)``, with every dimension its mesh axes do not divide unsharded.

  A dimension sharded over several mesh axes keeps the longest leading run of them whose
  size divides it. Mesh axes the mesh does not have are dropped. Each fallback is logged once.
  """
  spec = list(spec) + [None] * (len(shape) - len(spec))
  if len(spec) > len(shape):
    raise ValueError(f"PartitionSpec {tuple(spec)} has more entries than {what} of shape {tuple(shape)}.")
  out: list[MeshAxes] = []
  for dim, axes in zip(shape, spec):
    names = tuple(a for a in _mesh_axes_tuple(axes) if a in mesh.shape)
    if len(names) != len(_mesh_axes_tuple(axes)):
      _log_once(("missing", axes), "dora_jax: mesh axes %s are not in the mesh %s; that dimension"
                " is not sharded over them.", axes, dict(mesh.shape))
    kept = names
    while kept and dim % _axis_size(mesh, kept):
      kept = kept[:-1]
    if kept != names:
      _log_once(("indivisible", dim, names), "dora_jax: a dimension of size %d (%s) is not divisible"
                " by mesh axes %s of size %d; it is sharded over %s instead.",
                dim, what, names, _axis_size(mesh, names), kept or "nothing (replicated)")
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*out)


def _box_mesh_spec(box: Any, rules: Rules, where: str) -> tuple[MeshAxes, ...] | None:
  """Mesh axes of a boxed leaf's dimensions, or None for a leaf without partitioning metadata."""
  if isinstance(box, nn.LogicallyPartitioned):
    rules = box.rules or rules
    if not rules:
      raise ValueError(
          f"The param at '{where}' has logical axis names {tuple(box.names)} but no logical-axis"
          " rules are given: pass rules= (the model's, e.g. dora_jax.models.llama.LOGICAL_AXIS_RULES)"
          " or call under `with flax.linen.logical_axis_rules(rules):`.")
    return tuple(nn.logical_to_mesh_axes(box.names, rules))
  if isinstance(box, meta.Partitioned):
    return tuple(box.names)
  return None


def param_shardings(params: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """``NamedSharding`` for every leaf of a boxed params tree (concrete or abstract).

  Args:
    params: a tree whose leaves may be ``nn.LogicallyPartitioned`` / ``nn.Partitioned``
      boxes (from ``model.init`` or :func:`abstract_params`); unboxed leaves are replicated.
    mesh: the mesh.
    rules: logical axis name → mesh axes, for ``LogicallyPartitioned`` boxes (a box's own
      ``rules`` win). ``None``: the rules of Flax's context (``nn.logical_axis_rules``).

  Returns:
    The same tree without boxes (like ``nn.unbox(params)``), a ``NamedSharding`` at each
    leaf. A dimension its mesh axes do not divide is not sharded (logged once), so tiny
    models run on many devices.

  Raises:
    ValueError: a leaf has logical axis names but there are no rules (neither ``rules``,
      the context's, nor the box's own): without them every axis would silently be replicated.
  """
  rules = tuple(nn.get_logical_axis_rules() if rules is None else rules)

  def one(path, leaf):
    spec = _box_mesh_spec(leaf, rules, jax.tree_util.keystr(path, simple=True, separator="/"))
    value = leaf.value if isinstance(leaf, meta.Partitioned) else leaf
    shape = tuple(getattr(value, "shape", ()))
    if spec is None:
      return replicated(mesh)
    names = getattr(leaf, "names", None)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh, what=f"logical axes {names}"))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def abstract_params(model: nn.Module, *args: Any, collection: str | None = "params", **kwargs: Any) -> Any:
  """Shapes of ``model.init(key, *args, **kwargs)`` (``ShapeDtypeStruct``s), boxes kept.

  Returns the ``collection`` (default ``"params"``) of the variables, or all of them
  with ``collection=None``. Nothing is allocated.
  """
  variables = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *args)
  return variables if collection is None else variables[collection]


def init_sharded(model: nn.Module, rng: Array, *args: Any, mesh: Mesh,
                 rules: Rules | None = None, **kwargs: Any) -> tuple[Any, Any]:
  """Initializes the ``params`` straight into their shardings (no full copy on any device).

  ``rules``: as in :func:`param_shardings` (``None``: Flax's context rules).

  Returns:
    ``(params, shardings)``: unboxed params (plain ``jax.Array``s) and their
    ``NamedSharding`` tree (:func:`param_shardings`).
  """
  shardings = param_shardings(abstract_params(model, *args, **kwargs), mesh, rules)
  init = lambda key, *a: nn.unbox(model.init(key, *a, **kwargs)["params"])
  params = jax.jit(init, out_shardings=shardings)(rng, *args)
  return params, shardings


def _put(x: Any, sharding: jax.sharding.Sharding) -> Array:
  if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  host = np.asarray(x)  # every process holds the same full value
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params: Any, shardings: Any) -> Any:
  """Places a tree of arrays (jax or numpy, full values) with a matching sharding tree.

  Multi-process: numpy inputs (or arrays local to one process) must hold the same full
  value in every process; each process keeps only its devices' slices. To load a
  checkpoint without the full arrays, pass :func:`path_sharding_fn` to the loader.
  """
  return jax.tree_util.tree_map(_put, tree_lib.unbox(params), shardings)


def path_sharding_fn(shardings: Mapping) -> Callable[[tuple[str, ...], tuple[int, ...], Any], Any]:
  """``(path_tuple, shape, dtype) -> Sharding | None`` from a sharding tree.

  For :func:`dora_jax.models.hf.load_pretrained`'s ``sharding_fn``: each leaf is read
  straight into its shards. Paths the tree lacks give ``None`` (default placement).
  """
  def fn(path: tuple[str, ...], shape: tuple[int, ...], dtype: Any) -> Any:
    node: Any = shardings
    for k in path:
      if not isinstance(node, Mapping) or k not in node:
        return None
      node = node[k]
    return node if isinstance(node, jax.sharding.Sharding) else None

  return fn


# ---------------------------------------------------------------------------
# Adapters


def _spec_entries(sharding: Any, ndim: int) -> tuple[MeshAxes, ...]:
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return spec + (None,) * (ndim - len(spec))


def _flattened_axes(group: Sequence[MeshAxes]) -> MeshAxes:
  """Spec of the axis that ``group``'s axes flatten into (row-major): the first axis's, or None."""
  return group[0] if group else None


def adapter_specs(kernel_spec: Sequence[MeshAxes], layout: tree_lib.KernelLayout,
                  leaves: Sequence[str] | None = None) -> dict[str, P]:
  """PartitionSpecs of a layer's adapter leaves from their kernel's spec.

  Each leaf's axes roles (:class:`dora_jax.variants.LeafSpec`) decide: an ``"in"`` axis
  takes the spec of the kernel's first input axis, ``"out"`` of its first output axis,
  ``"rank"`` is never sharded; stacked axes keep theirs.

  Args:
    kernel_spec: one entry per kernel axis ``[*stack, *in, *out]`` (padded with None).
    layout: the kernel's layout.
    leaves: leaf names (default: LoRA's and ``magnitude``).

  Returns:
    ``{name: P}``, e.g. ``{"lora_a": P(*stack, in, None), "lora_b": P(*stack, None, out),
    "magnitude": P(*stack, out)}`` (see the module docstring).
  """
  s, k = layout.stack, layout.inputs
  stack = tuple(kernel_spec[:s])
  role = {"in": _flattened_axes(kernel_spec[s : s + k]),
          "out": _flattened_axes(kernel_spec[s + k :]), "rank": None}
  specs = variants.leaf_specs()
  names = leaves if leaves is not None else ("lora_a", "lora_b", variants.MAGNITUDE)
  return {n: P(*stack, *(role[r] for r in specs[n].axes)) for n in names}


def adapter_shardings(adapters: Mapping, params: Any, params_shardings: Any, mesh: Mesh, *,
                      replicate: bool = False) -> dict:
  """``NamedSharding``s of an adapters tree, derived from the shardings of their kernels.

  Args:
    adapters: the adapters pytree (arrays or ``ShapeDtypeStruct``s).
    params: the base params (boxed or not; arrays or abstract), for the kernels' shapes.
    params_shardings: the params' sharding tree (:func:`param_shardings`, unboxed layout).
    mesh: the mesh.
    replicate: replicate every adapter leaf instead.

  Returns:
    A tree mirroring ``adapters`` with a ``NamedSharding`` at each leaf (see
    :func:`adapter_specs`); a dimension its mesh axes do not divide is not sharded.
    Shared leaves (VeRA's projections, ``adapters["shared"]``) are replicated.
  """
  layouts = tree_lib.check_adapters(params, adapters)
  plain = tree_lib.unbox(params)
  flat = {}
  for path, adapter in tree_lib.flatten_adapters(adapters).items():
    module = tree_lib.get_path(plain, path)
    key = tree_lib.weight_key(module)
    kernel_shape = tuple(module[key].shape)
    if replicate:
      flat[path] = {k: replicated(mesh) for k in adapter}
      continue
    try:
      kernel_sharding = tree_lib.get_path(params_shardings, path)[key]
    except (KeyError, TypeError) as e:
      raise ValueError(f"params_shardings has no sharding for the kernel at '{path}/{key}';"
                       " pass the tree param_shardings() returned for these params.") from e
    specs = adapter_specs(_spec_entries(kernel_sharding, len(kernel_shape)), layouts[path],
                          tuple(adapter))
    flat[path] = {
        k: NamedSharding(mesh, fit_spec(specs[k], v.shape, mesh, what=f"{path}/{k}"))
        if k in specs else replicated(mesh)
        for k, v in adapter.items()
    }
  out = tree_lib.unflatten(flat)
  shared = tree_lib.shared_leaves(adapters)
  if shared:  # one copy per model, small ([I_max, r], [r, O_max]): replicated
    out[variants.SHARED_KEY] = {k: replicated(mesh) for k in shared}
  return out


def init_adapters_sharded(key: Array, params: Any, config: LoraConfig, params_shardings: Any,
                          mesh: Mesh, *, layouts: Mapping[str, tree_lib.KernelLayout] | None = None,
                          replicate: bool = False) -> tuple[dict, dict]:
  """:func:`dora_jax.init_adapters` run under ``jit``, straight into the adapters' shardings.

  Returns:
    ``(adapters, shardings)``; the same values as the unsharded ``init_adapters``.
  """
  init = functools.partial(initialize.init_adapters, config=config, layouts=layouts)
  abstract = jax.eval_shape(init, key, tree_lib.unbox(params))
  shardings = adapter_shardings(abstract, params, params_shardings, mesh, replicate=replicate)
  return jax.jit(init, out_shardings=shardings)(key, tree_lib.unbox(params)), shardings


# ---------------------------------------------------------------------------
# Optimizer state


def _first_mesh(shardings: Any) -> Mesh:
  for s in jax.tree_util.tree_leaves(shardings):
    if isinstance(s, NamedSharding):
      return s.mesh
  raise ValueError("trainable_shardings holds no NamedSharding: cannot tell the mesh; pass mesh=.")


def opt_state_shardings(tx: Any, trainable_shardings: Any, trainable_abstract: Any,
                        mesh: Mesh | None = None) -> Any:
  """Shardings of ``tx.init(trainable)``: param-shaped state like its param, the rest replicated.

  ``optax.tree_map_params`` finds the copies of the params tree inside the state (Adam's
  ``mu``/``nu``, ...) through ``optax.chain``, ``masked``, ``partition`` (e.g.
  :func:`dora_jax.freeze_base`) and ``inject_hyperparams``; each of their leaves takes the
  sharding of its param when it has the param's shape (replicated otherwise, e.g.
  Adafactor's factored rows). Counts, hyperparameters and other state are replicated.

  Args:
    tx: the optax transformation.
    trainable_shardings: sharding tree of the trainable params.
    trainable_abstract: the trainable params (arrays or ``ShapeDtypeStruct``s).
    mesh: for replicated leaves (default: the mesh of ``trainable_shardings``).

  Returns:
    A sharding tree with the structure of ``tx.init(trainable)``.

  Raises:
    ValueError: ``trainable_shardings`` does not mirror ``trainable_abstract``.
  """
  mesh = mesh or _first_mesh(trainable_shardings)
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  want = jax.tree_util.tree_structure(trainable_abstract)
  have = jax.tree_util.tree_structure(trainable_shardings, is_leaf=is_sharding)
  if want != have:
    raise ValueError(f"trainable_shardings has {have.num_leaves} leaves but the trainable tree has"
                     f" {want.num_leaves} (or another structure): they must mirror each other.")
  rep = replicated(mesh)
  state = jax.eval_shape(tx.init, trainable_abstract)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # a param `masked`/`partition` holds no state for

  def like_param(leaf, sharding, param):
    if masked(leaf):
      return leaf
    return sharding if tuple(leaf.shape) == tuple(param.shape) else rep

  return optax.tree_map_params(tx, like_param, state, trainable_shardings, trainable_abstract,
                               transform_non_params=lambda _: rep, is_leaf=masked)


# ---------------------------------------------------------------------------
# Optimizer state in host memory (the JAX counterpart of QLoRA's paged optimizers)

HOST_MEMORY_KIND = "pinned_host"


def supports_host_offload(device: Any = None) -> bool:
  """Whether ``device`` (default: the first) has a pinned host memory space.

  GPU and TPU backends and recent CPU backends do; where it is missing, keep the
  optimizer state in device memory (there is nothing to page to).
  """
  device = device or jax.devices()[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except (AttributeError, NotImplementedError):
    return False
  return HOST_MEMORY_KIND in kinds


def host_offloaded(shardings: Any) -> Any:
  """The same shardings with their arrays in pinned host memory (``memory_kind``).

  Use for ``tx.init``'s output and as the optimizer state's in/out shardings of a jitted
  step whose body calls :func:`to_device` on it first: between steps the state (Adam's two
  moments: 2× the trainable parameters) then lives in host memory, and each step streams
  it through the device — what QLoRA's paged optimizers buy, without paging.

  Raises:
    ValueError: if the backend has no pinned host memory (:func:`supports_host_offload`).
  """
  if not supports_host_offload():
    raise ValueError(f"The {jax.default_backend()} backend has no '{HOST_MEMORY_KIND}' memory: the"
                     " optimizer state cannot be offloaded here; keep it in device memory.")
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  return jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY_KIND) if is_sharding(s) else s,
                      shardings, is_leaf=is_sharding)


def to_device(tree: Any, shardings: Any) -> Any:
  """Inside ``jit``: moves a host-offloaded tree (:func:`host_offloaded`) to device memory.

  ``shardings`` are the device shardings of ``tree`` (before :func:`host_offloaded`).
  """
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  return jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind("device")), tree,
                      shardings, is_leaf=lambda x: is_sharding(x) or isinstance(x, optax.MaskedNode))
