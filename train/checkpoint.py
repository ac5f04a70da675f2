"""The trainer's resumable state on disk: adapters (or params), optimizer state, RNG,
step and data position, over an ``orbax.checkpoint.CheckpointManager``.

The library keeps adapter files (:mod:`dora_jax.checkpoint`) and the PEFT format
(:mod:`dora_jax.peft_format`); the training state belongs to the trainer.

What a checkpoint guarantees: a step directory appears only once it is complete
(Orbax writes into a temporary directory and renames it), so a kill during a save
leaves the previous steps as they were. Every array's SHA-256 is recorded in the
step's JSON record and checked on restore, so bytes damaged on disk are reported
(:class:`CorruptCheckpointError`) instead of read back as numbers;
:meth:`TrainCheckpointer.restore_latest` then falls back to the newest intact step
and :meth:`TrainCheckpointer.set_aside` moves damaged ones out of the way (they are
never deleted).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import re
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.checkpoint import (
    CheckpointMismatchError,
    PathLike,
    _config_dict,
    _default_sharding,
    _epath,
    _format_diff,
    _is_primary,
    _ocp,
    _version,
    config_diff,
)
from dora_jax.config import LoraConfig

Sharding = jax.sharding.Sharding
FORMAT_VERSION = 1
"""Version of the JSON record next to each training checkpoint."""

_log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
  """A checkpoint cannot be read back as it was written: its files are damaged
  (unreadable, or an array's bytes differ from the SHA-256 saved with them)."""


def _short(e: BaseException, limit: int = 300) -> str:
  """The first line of an error, capped: tensorstore's errors run to kilobytes."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  text = text.split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


@contextlib.contextmanager
def _quiet_unraisable():
  """Drops the "Exception ignored in <coroutine>" and "Task exception was never
  retrieved" dumps (kilobytes of tensorstore spec each) that Orbax's sibling reads
  print when one read of a damaged checkpoint fails; the failure itself is raised,
  shortened, by the caller."""
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  asyncio_log = logging.getLogger("asyncio")
  drop = lambda record: False
  asyncio_log.addFilter(drop)
  try:
    yield
  finally:
    gc.collect()  # the abandoned coroutines and tasks report while we are still quiet
    sys.unraisablehook = previous
    asyncio_log.removeFilter(drop)


def array_sha256(x: Any) -> str | None:
  """``"sha256:<hex>"`` of an array's bytes (C order), or ``None`` for an array
  spread over several processes (it is not gathered just to be hashed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  return "sha256:" + hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(x: Any) -> str:
  return str(jax.random.key_impl(x))


def _is_target_leaf(x: Any) -> bool:
  return isinstance(x, Sharding)


class TrainCheckpointer:
  """Resumable training checkpoints over ``orbax.checkpoint.CheckpointManager``.

  Each checkpoint is one step directory (written atomically, asynchronously)
  holding the array state and a JSON record: the step, the loader's
  ``data_state``, the config and the shape, dtype and SHA-256 of every array
  (verified on restore). The last ``keep`` checkpoints are kept.

  In several processes every process constructs the checkpointer and calls
  :meth:`save` with the same steps; Orbax writes from the primary host.

  Example::

      with TrainCheckpointer(workdir / "ckpt", config, keep=3, save_every=500) as ckpt:
        state = {"adapters": adapters, "opt_state": opt_state, "rng": rng}
        start = 0
        if ckpt.latest_step() is not None:
          # The newest intact step (arrays keep `state`'s shardings); damaged ones are skipped.
          restored, skipped = ckpt.restore_latest(target=state)
          ckpt.set_aside([s for s, _ in skipped])
          start, data_state = restored.pop("step"), restored.pop("data_state")
          state = restored
        for step in range(start + 1, total + 1):
          ...
          ckpt.save(step, {**state, "data_state": loader.state()})

  Args:
    directory: the checkpoint root (local or ``gs://``).
    config: the :class:`LoraConfig` (or any JSON-able dict, e.g. the trainer's
      full config) the run uses. If ``directory`` already holds checkpoints made
      under another config the constructor refuses (naming the fields).
      ``None`` opens the directory for reading whatever it holds (no check;
      :meth:`save` refuses).
    keep: how many of the most recent checkpoints to keep.
    save_every: :meth:`save` writes only at steps that are multiples of this
      (unless ``force=True``).
    overwrite: delete every checkpoint already in ``directory`` (the trainer's
      ``--overwrite``): the run starts afresh, and saving step 1 again works.
    ignore_fields: dotted config fields allowed to differ on resume (e.g.
      ``("train.steps",)`` to extend a run).
    async_save: write in a background thread (the call returns once the arrays
      are copied off the devices).

  Raises:
    CheckpointMismatchError: ``directory`` holds checkpoints from another config
      and ``overwrite`` is false (the newest readable record is compared;
      damaged ones are left for :meth:`restore_latest` to report).
  """

  def __init__(
      self,
      directory: PathLike,
      config: LoraConfig | Mapping[str, Any] | None,
      *,
      keep: int = 3,
      save_every: int = 1,
      overwrite: bool = False,
      ignore_fields: Sequence[str] = (),
      async_save: bool = True,
  ):
    if keep < 1 or save_every < 1:
      raise ValueError(f"keep and save_every must be >= 1, got {keep} and {save_every}.")
    ocp = _ocp()
    self.directory = _epath(directory)
    self.config = None if config is None else _config_dict(config)
    self.keep = keep
    self.save_every = save_every
    self._ignore = tuple(ignore_fields)
    self.deleted_steps: list[int] = []
    """The steps ``overwrite=True`` deleted."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # what a kill during a save left behind
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "record")
    )
    self._check_existing(overwrite)

  # -- lifecycle

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's resources."""
    self.wait()
    self._manager.close()

  # -- queries

  def latest_step(self) -> int | None:
    """The newest saved step, or ``None`` if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, oldest first."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether :meth:`save` at ``step`` writes: a multiple of ``save_every``, or
    Orbax saw a preemption signal (so the last state is saved before exit)."""
    if step in self._manager.all_steps():
      return False
    return step % self.save_every == 0 or bool(self._manager.reached_preemption(step))

  def read_record(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of a checkpoint: step, data_state, config, array shapes and checksums.

    Raises:
      FileNotFoundError: no checkpoint (at that step).
      CorruptCheckpointError: the record is missing or unreadable (damaged, or the
        step was not written by TrainCheckpointer).
    """
    step = self._resolve_step(step)
    ocp = _ocp()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
      record = dict(out["record"])
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"Step {step} in {self.directory} has no readable record (damaged, or not"
          f" written by TrainCheckpointer): {_short(e)}"
      ) from e
    if record.get("format") != "dora_jax.train_state" or not isinstance(record.get("arrays"), dict):
      raise CorruptCheckpointError(
          f"Step {step} in {self.directory} has a record without the dora_jax training-state"
          " fields (damaged, or not written by TrainCheckpointer)."
      )
    return record

  # -- save / restore

  def save(self, step: int, state: Mapping[str, Any], *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` if it is due (every ``save_every`` steps) or ``force``.

    Args:
      step: the training step (the checkpoint's name).
      state: a dict of array pytrees (``adapters``, ``opt_state``, ``rng``, ...;
        typed PRNG keys are fine) plus optionally ``data_state``, a small
        JSON-able dict (e.g. the data loader's position). A ``step`` entry is
        ignored: the argument is authoritative.
      force: save even if the step is not a multiple of ``save_every``.

    Returns:
      Whether a checkpoint was started (it finishes in the background; see
      :meth:`wait`).
    """
    ocp = _ocp()
    if self.config is None:
      raise ValueError(
          f"This TrainCheckpointer of {self.directory} was opened with config=None, for reading:"
          " pass the run's config to save."
      )
    if step in self._manager.all_steps() or not (force or self.should_save(step)):
      return False
    latest = self._manager.latest_step()
    if latest is not None and step < latest:
      raise ValueError(
          f"Saving step {step}, but {self.directory} already holds step {latest}:"
          " resume from it with restore(), or start fresh in a new directory or"
          " with overwrite=True."
      )
    arrays, record = self._split_state(step, state)
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record)
        ),
        force=True,
    )

  def restore(self, step: int | None = None, target: Any = None, *,
              verify: bool = True) -> dict[str, Any]:
    """Restores a checkpoint.

    Args:
      step: which step; ``None`` for the latest.
      target: the structure and placement of the arrays: the current state (or
        ``jax.eval_shape`` of it; leaves are arrays or ``jax.ShapeDtypeStruct``,
        whose ``sharding`` places the restored array), or the same pytree with
        ``jax.sharding.Sharding`` leaves (shapes come from the checkpoint). This
        is how a run resumes on another mesh. ``step`` and ``data_state`` entries
        are ignored. ``None``: plain nested dicts and lists on the default device
        (NamedTuples such as optax states come back as lists; pass a target to
        get them back).

      verify: check every array against the SHA-256 saved with it (arrays
        spread over several processes, and arrays restored into another dtype,
        are not checked).

    Returns:
      The state dict, with ``step`` (int) and ``data_state`` (dict) added.

    Raises:
      FileNotFoundError: no checkpoint (at that step).
      CheckpointMismatchError: ``target`` does not match the checkpoint's arrays.
      CorruptCheckpointError: the step's files are damaged (unreadable, or an
        array differs from its checksum); :meth:`restore_latest` falls back.
    """
    self.wait()
    step = self._resolve_step(step)
    record = self.read_record(step)
    manifest = record["arrays"]
    ocp = _ocp()
    try:
      if target is None:
        abstract = self._abstract_from_metadata(step)
      else:
        target = {k: v for k, v in dict(target).items() if k not in ("step", "data_state")}
        abstract = _abstract_target(target, manifest)
      with _quiet_unraisable():
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"Step {step} in {self.directory} cannot be read back: {_short(e)}"
      ) from e
    if verify:
      _verify_checksums(out, manifest, f"Step {step} in {self.directory}")
    if target is not None:
      out = _wrap_keys(out, manifest)
    else:
      out = _wrap_keys_by_metadata(out, manifest)
    out = dict(out)
    out["step"] = int(record["step"])
    out["data_state"] = record.get("data_state") or {}
    return out

  def restore_latest(self, target: Any = None) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """Restores the newest intact checkpoint, skipping damaged ones.

    Args:
      target: as in :meth:`restore`.

    Returns:
      ``(state, skipped)``: the state as :meth:`restore` returns it, and
      ``[(step, why)]`` for each newer step that was damaged (newest first).

    Raises:
      FileNotFoundError: ``directory`` holds no checkpoint.
      CorruptCheckpointError: every checkpoint is damaged (each is named).
      CheckpointMismatchError: ``target`` does not match the arrays.
    """
    self.wait()
    skipped: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, target), skipped
      except CorruptCheckpointError as e:
        skipped.append((step, str(e)))
    if not skipped:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    raise CorruptCheckpointError(
        f"Every checkpoint in {self.directory} is damaged:\n"
        + "\n".join(f"  step {s}: {why}" for s, why in skipped)
    )

  def set_aside(self, steps: Sequence[int]) -> Any:
    """Moves damaged steps out of the checkpoint directory (they are kept, not deleted).

    Each goes to ``<directory>.damaged/<step>`` (with a time suffix if that exists),
    so later saves at those steps and the keep-last-k rotation work again.

    Returns:
      The folder they were moved to, or ``None`` if ``steps`` is empty.
    """
    steps = sorted(set(int(s) for s in steps))
    if not steps:
      return None
    self.wait()
    dest = self.directory.parent / (self.directory.name + ".damaged")
    if _is_primary():
      dest.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.directory / str(step)
        if not src.exists():
          continue
        target = dest / str(step)
        if target.exists():
          target = dest / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        src.rename(target)
        _log.info("Moved damaged checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("train.checkpoint.set_aside")
    self._manager.reload()
    return dest

  # -- internals

  def _resolve_step(self, step: int | None) -> int:
    steps = self._manager.all_steps()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    elif step not in steps:
      raise FileNotFoundError(
          f"No checkpoint at step {step} in {self.directory}; steps: {sorted(steps)}."
      )
    return step

  def _check_existing(self, overwrite: bool) -> None:
    steps = self.all_steps()
    if not steps:
      return
    if overwrite:
      _log.info("Deleting checkpoints %s in %s (overwrite=True)", steps, self.directory)
      for s in reversed(steps):  # newest first: a kill midway leaves a consistent older run
        self._manager.delete(s)
      self._manager.reload()
      self.deleted_steps = steps
      return
    if self.config is None:
      return  # opened for reading
    saved = None
    for step in reversed(steps):  # the newest readable record speaks for the run
      try:
        saved = self.read_record(step).get("config") or {}
        break
      except CorruptCheckpointError:
        continue
    if saved is None:
      return  # nothing readable: restore_latest names the damage
    diff = config_diff(saved, self.config)
    diff = {k: v for k, v in diff.items()
            if not any(k == f or k.startswith(f + ".") for f in self._ignore)}
    if diff:
      raise CheckpointMismatchError(
          f"{self.directory} holds checkpoints (steps {steps}) from a different config:\n"
          f"{_format_diff(diff)}\nRefusing to resume from them or to overwrite them. To keep"
          " them, use a new directory (or the saved settings, to continue that run);"
          " overwrite=True (the trainer's --overwrite) deletes them."
      )

  def _split_state(self, step: int, state: Mapping[str, Any]):
    arrays = {k: v for k, v in state.items() if k not in ("step", "data_state")}
    data_state = state.get("data_state") or {}
    try:
      data_state = json.loads(json.dumps(dict(data_state)))
    except TypeError as e:
      raise TypeError(f"state['data_state'] must be a JSON-able dict: {e}") from e
    manifest: dict[str, dict[str, Any]] = {}

    def record_leaf(path, x):
      entry = {"shape": list(np.shape(x))}
      if _is_key(x):
        entry["key_impl"] = _key_impl_name(x)
        x = jax.random.key_data(x)
        entry["data_shape"] = list(x.shape)
      elif not isinstance(x, (jax.Array, np.ndarray)):
        x = np.asarray(x)
      entry["dtype"] = jnp.dtype(x.dtype).name
      entry["sha256"] = array_sha256(x)
      manifest[jax.tree_util.keystr(path)] = entry
      return x

    arrays = jax.tree_util.tree_map_with_path(record_leaf, arrays)
    record = {
        "format": "dora_jax.train_state",
        "format_version": FORMAT_VERSION,
        "dora_jax_version": _version(),
        "step": int(step),
        "data_state": data_state,
        "config": self.config,
        "arrays": manifest,
    }
    return arrays, record

  def _abstract_from_metadata(self, step: int):
    meta = self._manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    sharding = _default_sharding()
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
        tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )


def _abstract_target(target: Any, manifest: Mapping[str, Mapping[str, Any]]) -> Any:
  """``jax.ShapeDtypeStruct`` leaves (PRNG keys as their data) for Orbax to restore into."""
  default = _default_sharding()
  seen = set()

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    seen.add(name)
    entry = manifest.get(name)
    if entry is None:
      raise CheckpointMismatchError(
          f"The restore target has an array at {name} that the checkpoint lacks."
      )
    if isinstance(leaf, Sharding):
      shape = tuple(entry.get("data_shape", entry["shape"]))
      return jax.ShapeDtypeStruct(shape, jnp.dtype(entry["dtype"]), sharding=leaf)
    shape = tuple(np.shape(leaf))
    if shape != tuple(entry["shape"]):
      raise CheckpointMismatchError(
          f"The array at {name} has shape {tuple(entry['shape'])} in the checkpoint"
          f" but {shape} in the restore target."
      )
    sharding = getattr(leaf, "sharding", None) or default
    if _is_key(leaf):
      if "key_impl" not in entry:
        raise CheckpointMismatchError(
            f"The restore target has a PRNG key at {name}; the checkpoint has plain data."
        )
      return jax.ShapeDtypeStruct(
          tuple(entry["data_shape"]), jnp.dtype(entry["dtype"]), sharding=sharding
      )
    dtype = jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.dtype(entry["dtype"])
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  abstract = jax.tree_util.tree_map_with_path(one, target, is_leaf=_is_target_leaf)
  missing = sorted(set(manifest) - seen)
  if missing:
    raise CheckpointMismatchError(
        f"The checkpoint has arrays the restore target lacks: {missing[:10]}"
        f"{' ...' if len(missing) > 10 else ''}. Pass the full state as target."
    )
  return abstract


def _verify_checksums(tree: Any, manifest: Mapping[str, Mapping[str, Any]], where: str) -> None:
  """Raises :class:`CorruptCheckpointError` naming the first array whose bytes differ
  from the SHA-256 in ``manifest`` (paths matched as in :func:`_wrap_keys_by_metadata`)."""
  normalized = {_normalize_keystr(k): v for k, v in manifest.items()}

  def one(path, x):
    name = jax.tree_util.keystr(path)
    entry = normalized.get(_normalize_keystr(name), {})
    want = entry.get("sha256")
    if not want or jnp.dtype(x.dtype).name != entry.get("dtype"):
      return
    got = array_sha256(x)
    if got is not None and got != want:
      raise CorruptCheckpointError(
          f"{where}: the array at {name} differs from the checksum saved with it"
          " (its bytes were damaged on disk)."
      )

  jax.tree_util.tree_map_with_path(one, tree)


def _wrap_keys(tree: Any, manifest: Mapping[str, Mapping[str, Any]]) -> Any:
  """Turns saved PRNG key data back into typed keys (paths as in the saved state)."""

  def one(path, x):
    entry = manifest.get(jax.tree_util.keystr(path), {})
    if "key_impl" in entry:
      return jax.random.wrap_key_data(x, impl=entry["key_impl"])
    return x

  return jax.tree_util.tree_map_with_path(one, tree)


def _wrap_keys_by_metadata(tree: Any, manifest: Mapping[str, Mapping[str, Any]]) -> Any:
  """:func:`_wrap_keys` for a target-less restore, whose NamedTuples became lists."""
  # Without a target only top-level dict paths are reliable; match keys whose
  # path survives (dict keys and sequence indices print the same way).
  normalized = {_normalize_keystr(k): v for k, v in manifest.items()}

  def one(path, x):
    entry = normalized.get(_normalize_keystr(jax.tree_util.keystr(path)), {})
    if "key_impl" in entry:
      return jax.random.wrap_key_data(x, impl=entry["key_impl"])
    return x

  return jax.tree_util.tree_map_with_path(one, tree)


def _normalize_keystr(s: str) -> str:
  """``['a'][0].mu`` and ``['a'][0]['mu']`` both become ``a/0/mu``."""
  parts = re.findall(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)", s)
  return "/".join(a or b or c for a, b, c in parts)


__all__ = ["CheckpointMismatchError", "CorruptCheckpointError", "TrainCheckpointer", "array_sha256"]
