"""Meshes, shardings of base params / adapters / optimizer state / batches, multi-process setup.

The mesh has three axes, ``("data", "fsdp", "tensor")`` (:func:`make_mesh`). The
base params are sharded from their Flax logical axis names (``nn.with_logical_partitioning``)
through logical-axis rules (:data:`dora_jax.models.llama.LOGICAL_AXIS_RULES`:
``embed → fsdp``, ``heads``/``kv_heads``/``mlp``/``vocab`` → ``tensor``, ``batch → (data, fsdp)``).
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
the mesh in context while tracing: run jitted steps under :func:`use_mesh` (or build
them with :func:`make_sharded_step`, which does it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax import tree as tree_lib
from dora_jax import variants
from dora_jax.config import LoraConfig
from dora_jax.models.llama import LOGICAL_AXIS_RULES

Array = jax.Array
Rules = Sequence[tuple[str, Any]]
MeshAxes = None | str | tuple[str, ...]

logger = logging.getLogger("dora_jax")

MESH_AXES = ("data", "fsdp", "tensor")
"""Mesh axis names, outermost first (``tensor`` innermost: its devices are the closest)."""

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch axis is split over."""

_said: set[Any] = set()


def _log_once(key: Any, msg: str, *args: Any) -> None:
  if key not in _said:
    _said.add(key)
    logger.warning(msg, *args)


# ---------------------------------------------------------------------------
# Meshes


def parse_mesh_spec(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """Axis sizes ``{"data", "fsdp", "tensor"}`` from a mesh spec, using ``num_devices`` devices.

  Args:
    spec: ``"data=2,fsdp=2,tensor=2"``, ``"fsdp=-1"`` (``-1``: the devices that are
      left, at most one axis), a mapping of the same, or ``None`` / ``""`` / ``"1"``
      (every device on ``data``). Unnamed axes have size 1.
    num_devices: how many devices the mesh spans.

  Raises:
    ValueError: unknown or repeated axis, a size that is not a positive integer
      (or -1), or sizes that do not use exactly ``num_devices`` devices.
  """
  if num_devices < 1:
    raise ValueError(f"A mesh needs at least one device, got {num_devices}.")
  if spec is None or (isinstance(spec, str) and spec.strip() in ("", "1")):
    return {"data": num_devices, "fsdp": 1, "tensor": 1}
  if isinstance(spec, str):
    items = []
    for part in spec.split(","):
      part = part.strip()
      if not part:
        continue
      m = re.fullmatch(r"([A-Za-z_]\w*)\s*[=:]\s*(-?\d+)", part)
      if not m:
        raise ValueError(
            f"Cannot parse mesh spec {spec!r} at {part!r}: expected comma-separated"
            f" 'axis=size' with axis in {MESH_AXES}, e.g. 'data=2,fsdp=2,tensor=2' or"
            " 'fsdp=-1' (-1 = the devices that are left).")
      items.append((m.group(1), int(m.group(2))))
  else:
    items = [(str(k), v) for k, v in spec.items()]
  sizes: dict[str, int] = {}
  for name, size in items:
    if name not in MESH_AXES:
      raise ValueError(f"Unknown mesh axis {name!r} in {spec!r}; the axes are {MESH_AXES}.")
    if name in sizes:
      raise ValueError(f"Mesh axis {name!r} is given twice in {spec!r}.")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"Mesh axis {name}={size!r} in {spec!r}: sizes are positive integers or -1.")
    sizes[name] = int(size)
  rest = [k for k, v in sizes.items() if v == -1]
  if len(rest) > 1:
    raise ValueError(f"Only one mesh axis may be -1 (the rest of the devices), got {rest} in {spec!r}.")
  known = math.prod(v for v in sizes.values() if v != -1)
  if rest:
    if num_devices % known:
      raise ValueError(
          f"Mesh spec {spec!r}: the fixed axes multiply to {known}, which does not divide the"
          f" {num_devices} devices that exist, so '{rest[0]}=-1' has no integer size.")
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    hint = ("divide" if num_devices % known == 0 else "does not divide")
    raise ValueError(
        f"Mesh spec {spec!r} uses {known} devices but {num_devices} exist ({known} {hint}"
        f" {num_devices}). Make the sizes multiply to {num_devices}, give one axis -1 to take"
        " the devices that are left, or pass devices= to use a subset.")
  return {k: sizes.get(k, 1) for k in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all, every process).

  Args:
    spec: see :func:`parse_mesh_spec` (``"data=2,fsdp=2,tensor=2"``, ``"fsdp=-1"``, ``"1"``).
    devices: the devices to lay out (default ``jax.devices()``).

  Returns:
    A mesh of shape ``(data, fsdp, tensor)`` with ``Auto`` axis types, devices placed by
    ``jax.make_mesh`` (topology-aware on TPU / GPU), else in order.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[k] for k in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except Exception:  # noqa: BLE001 - an unusual device set: plain order (processes stay contiguous)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
  """Context in which ``nn.with_logical_constraint`` takes effect: ``mesh`` set and ``rules`` active.

  Enter it around the *call* of a jitted function (tracing happens there), never inside
  a jitted function (``jax.set_mesh`` is not allowed under ``jit``).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


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


def _box_mesh_spec(box: Any, rules: Rules) -> tuple[MeshAxes, ...] | None:
  """Mesh axes of a boxed leaf's dimensions, or None for a leaf without partitioning metadata."""
  if isinstance(box, nn.LogicallyPartitioned):
    return tuple(nn.logical_to_mesh_axes(box.names, box.rules or rules))
  if isinstance(box, meta.Partitioned):
    return tuple(box.names)
  return None


def param_shardings(params: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """``NamedSharding`` for every leaf of a boxed params tree (concrete or abstract).

  Args:
    params: a tree whose leaves may be ``nn.LogicallyPartitioned`` / ``nn.Partitioned``
      boxes (from ``model.init`` or :func:`abstract_params`); unboxed leaves are replicated.
    mesh: the mesh.
    rules: logical axis name → mesh axes (used for ``LogicallyPartitioned`` boxes).

  Returns:
    The same tree without boxes (like ``nn.unbox(params)``), a ``NamedSharding`` at each
    leaf. A dimension its mesh axes do not divide is not sharded (logged once), so tiny
    models run on many devices.
  """
  def one(leaf):
    spec = _box_mesh_spec(leaf, rules)
    value = leaf.value if isinstance(leaf, meta.Partitioned) else leaf
    shape = tuple(getattr(value, "shape", ()))
    if spec is None:
      return replicated(mesh)
    names = getattr(leaf, "names", None)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh, what=f"logical axes {names}"))

  return jax.tree_util.tree_map(one, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def abstract_params(model: nn.Module, *args: Any, collection: str | None = "params", **kwargs: Any) -> Any:
  """Shapes of ``model.init(key, *args, **kwargs)`` (``ShapeDtypeStruct``s), boxes kept.

  Returns the ``collection`` (default ``"params"``) of the variables, or all of them
  with ``collection=None``. Nothing is allocated.
  """
  variables = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *args)
  return variables if collection is None else variables[collection]


def init_sharded(model: nn.Module, rng: Array, *args: Any, mesh: Mesh,
                 rules: Rules = LOGICAL_AXIS_RULES, **kwargs: Any) -> tuple[Any, Any]:
  """Initializes the ``params`` straight into their shardings (no full copy on any device).

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
  init = functools.partial(tree_lib.init_adapters, config=config, layouts=layouts)
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

  A state leaf (Adam's ``mu``/``nu``, ...) takes the sharding of the trainable leaf
  whose key path is a suffix of its own and whose shape it has; counts, scalars and
  state of any other shape are replicated. Works through ``optax.chain``,
  ``masked``, ``multi_transform`` and ``inject_hyperparams`` states.

  Args:
    tx: the optax transformation.
    trainable_shardings: sharding tree of the trainable params.
    trainable_abstract: the trainable params (arrays or ``ShapeDtypeStruct``s).
    mesh: for replicated leaves (default: the mesh of ``trainable_shardings``).

  Returns:
    A sharding tree with the structure of ``tx.init(trainable)``.
  """
  mesh = mesh or _first_mesh(trainable_shardings)
  state = jax.eval_shape(tx.init, trainable_abstract)
  params_flat = jax.tree_util.tree_flatten_with_path(trainable_abstract)[0]
  shard_leaves = jax.tree_util.tree_leaves(
      trainable_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(shard_leaves) != len(params_flat):
    raise ValueError(f"trainable_shardings has {len(shard_leaves)} leaves but the trainable"
                     f" tree has {len(params_flat)}: they must mirror each other.")
  by_path = {tuple(path): (tuple(leaf.shape), s) for (path, leaf), s in zip(params_flat, shard_leaves)}

  def one(path, leaf):
    path = tuple(path)
    for start in range(len(path) + 1):
      hit = by_path.get(path[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, state)


# ---------------------------------------------------------------------------
# Batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (the leading axis) split over ``("data", "fsdp")``, the rest replicated: for ``[B, T, ...]``."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_multiple(mesh: Mesh) -> int:
  """The global batch size must be a multiple of this (``data × fsdp``)."""
  return _axis_size(mesh, BATCH_AXES)


def batch_process_slot(mesh: Mesh) -> tuple[int, int]:
  """``(slot, num_slots)``: which contiguous block of the global batch this process feeds.

  ``num_slots`` processes hold distinct row blocks (``jax.process_count()`` unless a
  ``tensor`` group spans processes, when processes in one group feed the same rows).
  Give these to the data iterator as its ``process_index`` / ``process_count``.

  Raises:
    ValueError: if a process's devices hold a non-contiguous set of row blocks.
  """
  n = batch_size_multiple(mesh)
  index_map = batch_sharding(mesh).devices_indices_map((n,))
  blocks: dict[int, set[int]] = {}
  for dev, idx in index_map.items():
    start = idx[0].start or 0
    blocks.setdefault(dev.process_index, set()).add(start)
  groups = sorted({tuple(sorted(b)) for b in blocks.values()})
  for g in groups:
    if g != tuple(range(g[0], g[0] + len(g))):
      raise ValueError(f"This mesh gives a process the non-contiguous batch blocks {g}; lay out"
                       " the devices so that each process holds a contiguous range of (data, fsdp).")
  mine = tuple(sorted(blocks[jax.process_index()]))
  return groups.index(mine), len(groups)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Global arrays from this process's rows (a tree of numpy arrays ``[B_local, ...]``).

  Single process: ``B_local`` is the global batch. Multi-process: each process passes
  its own contiguous block of rows (:func:`batch_process_slot`).

  Raises:
    ValueError: if the global batch is not a multiple of ``data × fsdp``.
  """
  sharding = batch_sharding(mesh)
  _, slots = batch_process_slot(mesh)
  need = batch_size_multiple(mesh)
  for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
    rows = np.shape(x)[0] * slots if np.ndim(x) else 0
    if rows % need:
      raise ValueError(
          f"Batch leaf {jax.tree_util.keystr(path)} has {rows} rows in all; the batch is split over"
          f" data x fsdp = {need} devices, so the global batch must be a multiple of {need}"
          " (pad it, e.g. train.steps.pad_rows).")
  return jax.make_array_from_process_local_data(sharding, batch)


# ---------------------------------------------------------------------------
# Steps


class ShardedStep:
  """A jitted function with explicit in / out shardings, traced and run under :func:`use_mesh`.

  Attributes:
    jitted: the ``jax.jit`` object (its trace does not see the rules unless under ``use_mesh``).
    mesh, rules: the context entered around every call.
  """

  def __init__(self, fn: Callable, mesh: Mesh, in_shardings: Any, out_shardings: Any,
               donate_argnums: Sequence[int] = (), rules: Rules = LOGICAL_AXIS_RULES,
               **jit_kwargs: Any):
    self.mesh, self.rules = mesh, rules
    self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                          donate_argnums=tuple(donate_argnums), **jit_kwargs)
    functools.update_wrapper(self, fn)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    with use_mesh(self.mesh, self.rules):
      return self.jitted(*args, **kwargs)

  def lower(self, *args: Any, **kwargs: Any) -> Any:
    """``jax.jit(...).lower`` under the mesh (``.compile().as_text()`` shows the HLO)."""
    with use_mesh(self.mesh, self.rules):
      return self.jitted.lower(*args, **kwargs)


def make_sharded_step(step_fn: Callable, mesh: Mesh, in_shardings: Any, out_shardings: Any,
                      donate_argnums: Sequence[int] = (), rules: Rules = LOGICAL_AXIS_RULES,
                      **jit_kwargs: Any) -> ShardedStep:
  """``jax.jit(step_fn, in_shardings, out_shardings, donate_argnums)`` run under ``use_mesh(mesh, rules)``.

  For ``step(frozen, trainable, opt_state, batch, rng) -> (trainable, opt_state, metrics)``:
  ``in_shardings = (frozen_s, trainable_s, opt_s, batch_sharding(mesh), replicated(mesh))``,
  ``out_shardings = (trainable_s, opt_s, replicated(mesh))``, ``donate_argnums=(1, 2)``.
  A single ``Sharding`` stands for a whole argument / output subtree (e.g. a batch dict).
  """
  return ShardedStep(step_fn, mesh, in_shardings, out_shardings, donate_argnums, rules, **jit_kwargs)


def per_device_bytes(tree: Any) -> int:
  """The most bytes any one (addressable) device holds of a tree of ``jax.Array``s."""
  totals: dict[Any, int] = {}
  for x in jax.tree_util.tree_leaves(tree):
    for shard in x.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return max(totals.values(), default=0)


def describe(shardings: Any) -> dict[str, str]:
  """``{"/"-joined path: str(PartitionSpec)}`` of a sharding tree (for logs and tests)."""
  out = {}
  for path, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    out[key] = str(s.spec) if isinstance(s, NamedSharding) else str(s)
  return out


# ---------------------------------------------------------------------------
# Multi-process


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from e


def _detected_cluster_processes() -> int | None:
  """Process count of a cluster JAX auto-detects (Slurm, Open MPI, TPU, ...), or None."""
  try:
    from jax._src import clusters  # private: guarded, absent API means "not detected"

    for env in clusters.ClusterEnv._cluster_types:
      if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
        return int(env.get_process_count())
  except Exception:  # noqa: BLE001 - private API: any failure means 'not detected'
    return None
  return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` for a multi-process run; a no-op for one process. Idempotent.

  Call it first, before any other JAX call (``jax.devices()``, ``device_put``, ...).
  Arguments default to ``DORA_JAX_COORDINATOR`` (``host:port`` of process 0; else
  ``JAX_COORDINATOR_ADDRESS``), ``DORA_JAX_NUM_PROCESSES``, ``DORA_JAX_PROCESS_ID``.
  With none of them set, a cluster JAX detects by itself (Slurm, Open MPI, Cloud TPU,
  Kubernetes) with more than one process is initialized from its environment.
  On CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``).

  Returns:
    True if a multi-process runtime is running (started now or before), else False.

  Raises:
    RuntimeError: if JAX's backend was already initialized by an earlier JAX call.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = (coordinator_address or os.environ.get("DORA_JAX_COORDINATOR")
                         or os.environ.get("JAX_COORDINATOR_ADDRESS") or None)
  if num_processes is None:
    num_processes = _env_int("DORA_JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("DORA_JAX_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if explicit:
    if num_processes == 1:
      return False
  else:
    count = _detected_cluster_processes()
    if count is None or count <= 1:
      return False
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except RuntimeError as e:
    raise RuntimeError(
        f"initialize_distributed() failed: {e}. It must run before any other JAX call"
        " (jax.devices(), device_put, jit, ...).") from e
  return True
