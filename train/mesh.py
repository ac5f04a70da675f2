"""The trainer's devices: meshes from a spec string, batch placement, sharded steps, multi-process setup.

The mesh has three axes, ``("data", "fsdp", "tensor")`` (:func:`make_mesh`); the batch
is split over ``data × fsdp`` (:func:`shard_batch`). The base params, adapters and
optimizer state are sharded by the library (:mod:`dora_jax.sharding`) through the
model's logical-axis rules (:data:`dora_jax.models.llama.LOGICAL_AXIS_RULES`, the
default here: the trainer runs that model family). Jitted steps trace under
:func:`use_mesh` (mesh and rules in context), which :func:`make_sharded_step` enters
around every call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax.models.llama import LOGICAL_AXIS_RULES
from dora_jax.sharding import Rules

MESH_AXES = ("data", "fsdp", "tensor")
"""Mesh axis names, outermost first (``tensor`` innermost: its devices are the closest)."""

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch axis is split over."""


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


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
  """Context in which ``nn.with_logical_constraint`` takes effect: ``mesh`` set and ``rules`` active.

  Enter it around the *call* of a jitted function (tracing happens there), never inside
  a jitted function (``jax.set_mesh`` is not allowed under ``jit``).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


# ---------------------------------------------------------------------------
# Batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (the leading axis) split over ``("data", "fsdp")``, the rest replicated: for ``[B, T, ...]``."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_multiple(mesh: Mesh) -> int:
  """The global batch size must be a multiple of this (``data × fsdp``)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


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
  ``in_shardings = (frozen_s, trainable_s, opt_s, batch_sharding(mesh), rep)``,
  ``out_shardings = (trainable_s, opt_s, rep)``, ``donate_argnums=(1, 2)``, ``rep`` being
  ``dora_jax.sharding.replicated(mesh)``.
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
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_sharding)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          str(s.spec) if isinstance(s, NamedSharding) else str(s) for path, s in flat}


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
