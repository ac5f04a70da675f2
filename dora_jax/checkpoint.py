"""Checkpoints: adapter-only Orbax save / load, a training-state manager, PEFT import / export.

Three ways to put adapters on disk:

* :func:`save_adapters` / :func:`load_adapters`: the adapters pytree alone (a few
  MB), written with Orbax next to a JSON sidecar ``dora_jax.json`` that records the
  :class:`~dora_jax.LoraConfig`, the dora_jax version, every adapter leaf's shape
  and dtype and (optionally) a fingerprint of the base params. Loading refuses a
  checkpoint whose config differs from the expected one or whose shapes do not fit
  the given params, and can place each array directly with a ``jax.sharding``
  (save on one mesh, restore on another).
* :class:`TrainCheckpointer`: the trainer's resumable state (adapters, optimizer
  state, RNG, step, a small JSON ``data_state``) over an
  ``orbax.checkpoint.CheckpointManager``: atomic, asynchronous, every N steps,
  keeping the last k; it refuses to resume from a directory written under another
  config.
* :func:`export_peft` / :func:`import_peft`: HF PEFT's on-disk format
  (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained`` (and vLLM, for LoRA) load.

PEFT tensor names (checked against ``peft`` 0.21 ``save_pretrained`` output and
``peft/utils/save_and_load.py``), for a module named ``<name>`` in the HF model:

=========================================================  ============  ===================
key                                                        torch shape   ours
=========================================================  ============  ===================
``base_model.model.<name>.lora_A.weight``                  ``[r, I]``    ``lora_a.T``
``base_model.model.<name>.lora_B.weight``                  ``[O, r]``    ``lora_b.T``
``base_model.model.<name>.lora_magnitude_vector``          ``[O]``       ``magnitude``
``base_model.model.<name>.lora_embedding_A`` (Embedding)   ``[r, V]``    ``lora_a.T``
``base_model.model.<name>.lora_embedding_B`` (Embedding)   ``[D, r]``    ``lora_b.T``
=========================================================  ============  ===================

(PEFT keeps DoRA's magnitude in a ``DoraLinearLayer`` whose parameter is
``lora_magnitude_vector.<adapter>.weight``; ``get_peft_model_state_dict`` strips the
``.weight`` and the adapter name when saving, and ``set_peft_model_state_dict``
puts them back.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.config import LoraConfig
from dora_jax.tree import (
    KernelLayout,
    check_adapters,
    flatten_adapters,
    iter_modules,
    unbox,
    unflatten,
    weight_key,
)

PathLike = Any  # str, os.PathLike or etils.epath.Path (gs:// paths work through Orbax)
Sharding = jax.sharding.Sharding

SIDECAR_NAME = "dora_jax.json"
"""The JSON file next to an adapter-only checkpoint."""
ADAPTERS_SUBDIR = "adapters"
"""The Orbax directory of an adapter-only checkpoint."""
FORMAT_VERSION = 1
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not match what the caller expects (config, shapes, model)."""


# ---------------------------------------------------------------------------
# Small helpers


def _ocp():
  """``orbax.checkpoint``, imported on first use (it is slow to import)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp


def _epath(path: PathLike):
  """``path`` as an absolute ``epath.Path``: Orbax refuses relative paths, users give them."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  p = epath.Path(path)
  if "://" in str(path):  # gs://, s3:// ... are absolute already
    return p
  return epath.Path(os.path.abspath(os.fspath(path)))


def _version() -> str:
  import dora_jax  # pylint: disable=g-import-not-at-top

  return getattr(dora_jax, "__version__", "unknown")


def _is_primary() -> bool:
  return jax.process_index() == 0


def _write_json_atomic(path, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` via a temporary file and a rename."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.rename(path)


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "to_dict"):
    return obj.to_dict()
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return dataclasses.asdict(obj)
  if isinstance(obj, (tuple, set, frozenset)):
    return list(obj)
  return str(obj)  # dtypes, paths, enums: compared by their text


def _config_dict(config: LoraConfig | Mapping[str, Any]) -> dict[str, Any]:
  """A JSON-normalized dict of a :class:`LoraConfig` or of a (nested) config mapping."""
  d = config.to_dict() if isinstance(config, LoraConfig) else dict(config)
  return json.loads(json.dumps(d, sort_keys=True, default=_json_default))


def config_diff(
    saved: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
  """``{dotted field: (saved value, expected value)}`` for every field that differs.

  Nested mappings are compared field by field (``"optim.lr"``); a field missing on
  one side shows as ``"<missing>"``.
  """
  out: dict[str, tuple[Any, Any]] = {}
  for key in sorted(set(saved) | set(expected), key=str):
    name = f"{prefix}{key}"
    a, b = saved.get(key, "<missing>"), expected.get(key, "<missing>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out.update(config_diff(a, b, name + "."))
    elif a != b:
      out[name] = (a, b)
  return out


def _format_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
  return "\n".join(f"  {k}: saved {a!r}, expected {b!r}" for k, (a, b) in diff.items())


def params_fingerprint(params: Any) -> str:
  """A hash of the params' paths, shapes and dtypes (not their values).

  Two models with the same architecture and dtypes share a fingerprint; works on
  abstract params (``jax.ShapeDtypeStruct``) and boxed params alike.
  """
  leaves = jax.tree_util.tree_flatten_with_path(unbox(params))[0]
  lines = sorted(
      f"{jax.tree_util.keystr(p)}:{tuple(np.shape(x))}:{jnp.dtype(x.dtype).name}"
      for p, x in leaves
  )
  return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _default_sharding() -> Sharding:
  """One device in a single process; replicated over all devices in several."""
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _to_host(x: Any) -> np.ndarray:
  """A numpy copy of ``x``, gathering arrays that span several processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------
# Adapter-only checkpoints


def _adapter_manifest(adapters: Mapping) -> dict[str, dict[str, dict[str, Any]]]:
  """``{path: {leaf: {"shape": [...], "dtype": name}}}`` of an adapters tree."""
  return {
      path: {
          k: {"shape": list(np.shape(v)), "dtype": jnp.dtype(v.dtype).name}
          for k, v in sorted(leaves.items())
      }
      for path, leaves in flatten_adapters(adapters).items()
  }


def read_adapter_info(directory: PathLike) -> dict[str, Any]:
  """The sidecar of a :func:`save_adapters` checkpoint.

  Returns:
    A dict with ``config`` (a :meth:`LoraConfig.to_dict`), ``dora_jax_version``,
    ``step``, ``metadata``, ``adapters`` (shapes and dtypes by path) and
    ``base_fingerprint``.

  Raises:
    FileNotFoundError: if ``directory`` holds no dora_jax adapter checkpoint.
  """
  path = _epath(directory) / SIDECAR_NAME
  if not path.exists():
    raise FileNotFoundError(
        f"{directory} holds no dora_jax adapter checkpoint: {SIDECAR_NAME} is missing"
        " (a save that did not finish, or another format; for a PEFT adapter use"
        " import_peft, for a training checkpoint TrainCheckpointer)."
    )
  info = json.loads(path.read_text())
  if info.get("format_version", 0) > FORMAT_VERSION:
    raise CheckpointMismatchError(
        f"{directory} was written by dora_jax {info.get('dora_jax_version')} in"
        f" format {info.get('format_version')}; this dora_jax ({_version()}) reads"
        f" format <= {FORMAT_VERSION}. Upgrade dora_jax."
    )
  return info


def save_adapters(
    directory: PathLike,
    adapters: Mapping,
    config: LoraConfig,
    *,
    step: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    params: Any = None,
    overwrite: bool = False,
) -> None:
  """Saves the adapters (only) with Orbax, plus a JSON sidecar.

  Writes ``directory/adapters/`` (an Orbax ``StandardCheckpointer`` tree, atomic)
  and then ``directory/dora_jax.json`` (config, version, shapes, step, metadata,
  base fingerprint); a directory without the sidecar is never loaded. In several
  processes every process must call this (Orbax writes from the primary host);
  returns once the data are on disk.

  Args:
    directory: where to write; must not hold a checkpoint unless ``overwrite``.
    adapters: the adapters pytree (any sharding).
    config: the config the adapters were made with.
    step: training step, recorded in the sidecar.
    metadata: any JSON-able dict, recorded in the sidecar.
    params: the base params (or abstract params); if given, their
      :func:`params_fingerprint` is recorded and the adapters are checked to fit.
    overwrite: replace an existing checkpoint in ``directory``.

  Raises:
    FileExistsError: ``directory`` already holds a checkpoint and not ``overwrite``.
    ValueError: ``params`` given and the adapters do not fit them.
  """
  ocp = _ocp()
  root = _epath(directory)
  sidecar = root / SIDECAR_NAME
  target = root / ADAPTERS_SUBDIR
  if (sidecar.exists() or target.exists()) and not overwrite:
    raise FileExistsError(
        f"{directory} already holds an adapter checkpoint; pass overwrite=True to"
        " replace it, or save to another directory."
    )
  if params is not None:
    check_adapters(params, adapters)
  info = {
      "format": "dora_jax.adapters",
      "format_version": FORMAT_VERSION,
      "dora_jax_version": _version(),
      "config": _config_dict(config),
      "step": None if step is None else int(step),
      "metadata": json.loads(json.dumps(dict(metadata or {}))),
      "adapters": _adapter_manifest(adapters),
      "base_fingerprint": None if params is None else params_fingerprint(params),
  }
  # The sidecar goes first and comes back last: a crash in between leaves a
  # directory that load_adapters refuses rather than one with mismatched halves.
  if _is_primary():
    root.mkdir(parents=True, exist_ok=True)
    if sidecar.exists():
      sidecar.unlink()
  # Nested dicts (no '/' in Orbax's names), adapter leaves only.
  tree = unflatten({path: dict(leaves) for path, leaves in flatten_adapters(adapters).items()})
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, tree, force=overwrite)
    ckptr.wait_until_finished()
  if _is_primary():
    _write_json_atomic(sidecar, info)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("dora_jax.save_adapters")


def _leaf_shardings(
    shardings: Sharding | Mapping | None, manifest: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Sharding]]:
  """``{path: {leaf: Sharding}}`` from one sharding, a matching pytree, or ``None``."""
  if shardings is None or isinstance(shardings, Sharding):
    s = shardings or _default_sharding()
    return {p: {k: s for k in leaves} for p, leaves in manifest.items()}
  flat = flatten_adapters(shardings)
  missing = [f"{p}/{k}" for p, leaves in manifest.items() for k in leaves
             if k not in flat.get(p, {})]
  extra = [f"{p}/{k}" for p, leaves in flat.items() for k in leaves
           if k not in manifest.get(p, {})]
  if missing or extra:
    raise ValueError(
        "`shardings` must mirror the saved adapters. Missing: "
        f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; not in the checkpoint:"
        f" {extra[:10]}{' ...' if len(extra) > 10 else ''}."
    )
  return flat


def load_adapters(
    directory: PathLike,
    config: LoraConfig | None = None,
    *,
    params: Any = None,
    shardings: Sharding | Mapping | None = None,
) -> tuple[dict, LoraConfig]:
  """Loads adapters written by :func:`save_adapters`.

  Args:
    directory: the checkpoint directory.
    config: the config the caller expects; refused if the saved one differs in
      any field. ``None`` accepts the saved config.
    params: the base params (or abstract params) the adapters will be used with;
      the adapters' shapes are checked against them before anything is read.
    shardings: where to put the arrays: one ``jax.sharding.Sharding`` for every
      leaf, or a pytree of them mirroring the adapters (e.g. derived from the
      base kernels' specs on a new mesh); arrays are read straight into place.
      ``None``: the first local device (all devices, replicated, in several
      processes).

  Returns:
    ``(adapters, config)``: the adapters with the saved shapes and dtypes, and the
    saved config.

  Raises:
    FileNotFoundError: not a dora_jax adapter checkpoint.
    CheckpointMismatchError: the saved config differs from ``config`` (the message
      names the fields), or the adapters do not fit ``params`` (it names the path).
  """
  info = read_adapter_info(directory)
  saved_config = LoraConfig.from_dict(info["config"])
  if config is not None:
    diff = config_diff(info["config"], _config_dict(config))
    if diff:
      raise CheckpointMismatchError(
          f"The adapters in {directory} were saved with a different config:\n"
          f"{_format_diff(diff)}\nPass the matching config, or config=None to take"
          " the saved one."
      )
  manifest = info["adapters"]
  leaf_shardings = _leaf_shardings(shardings, manifest)
  abstract = unflatten({
      path: {
          k: jax.ShapeDtypeStruct(
              tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=leaf_shardings[path][k]
          )
          for k, spec in leaves.items()
      }
      for path, leaves in manifest.items()
  })
  if params is not None:
    try:
      check_adapters(params, abstract)
    except ValueError as e:
      raise CheckpointMismatchError(
          f"The adapters in {directory} do not fit the given params: {e}"
      ) from e
    saved_fp = info.get("base_fingerprint")
    if saved_fp and saved_fp != params_fingerprint(params):
      warnings.warn(
          f"The adapters in {directory} fit the given params, but were saved"
          " against a base model with other parameter names, shapes or dtypes"
          " (base_fingerprint differs).",
          stacklevel=2,
      )
  with _ocp().StandardCheckpointer() as ckptr:
    restored = ckptr.restore(_epath(directory) / ADAPTERS_SUBDIR, abstract)
  return restored, saved_config


# ---------------------------------------------------------------------------
# Training state


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
  ``data_state``, the config and the shapes of every array. The last ``keep``
  checkpoints are kept.

  In several processes every process constructs the checkpointer and calls
  :meth:`save` with the same steps; Orbax writes from the primary host.

  Example::

      with TrainCheckpointer(workdir / "ckpt", config, keep=3, save_every=500) as ckpt:
        state = {"adapters": adapters, "opt_state": opt_state, "rng": rng}
        start = 0
        if ckpt.latest_step() is not None:
          restored = ckpt.restore(target=state)  # arrays keep `state`'s shardings
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
    keep: how many of the most recent checkpoints to keep.
    save_every: :meth:`save` writes only at steps that are multiples of this
      (unless ``force=True``).
    overwrite: delete the checkpoints already in ``directory`` instead of
      refusing when their config differs (the trainer's ``--overwrite``).
    ignore_fields: dotted config fields allowed to differ on resume (e.g.
      ``("train.steps",)`` to extend a run).
    async_save: write in a background thread (the call returns once the arrays
      are copied off the devices).

  Raises:
    CheckpointMismatchError: ``directory`` holds checkpoints from another config
      (or not made by dora_jax) and ``overwrite`` is false.
  """

  def __init__(
      self,
      directory: PathLike,
      config: LoraConfig | Mapping[str, Any],
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
    self.config = _config_dict(config)
    self.keep = keep
    self.save_every = save_every
    self._ignore = tuple(ignore_fields)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
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
    """The JSON record of a checkpoint: step, data_state, config, array shapes."""
    step = self._resolve_step(step)
    ocp = _ocp()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointMismatchError(
          f"Step {step} in {self.directory} has no readable dora_jax record ({e});"
          " it was not written by TrainCheckpointer."
      ) from e
    return dict(out["record"])

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

  def restore(self, step: int | None = None, target: Any = None) -> dict[str, Any]:
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

    Returns:
      The state dict, with ``step`` (int) and ``data_state`` (dict) added.

    Raises:
      FileNotFoundError: no checkpoint (at that step).
      CheckpointMismatchError: ``target`` does not match the checkpoint's arrays.
    """
    self.wait()
    step = self._resolve_step(step)
    record = self.read_record(step)
    manifest = record["arrays"]
    if target is None:
      abstract = self._abstract_from_metadata(step)
    else:
      target = {k: v for k, v in dict(target).items() if k not in ("step", "data_state")}
      abstract = _abstract_target(target, manifest)
    ocp = _ocp()
    out = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
    if target is not None:
      out = _wrap_keys(out, manifest)
    else:
      out = _wrap_keys_by_metadata(out, manifest)
    out = dict(out)
    out["step"] = int(record["step"])
    out["data_state"] = record.get("data_state") or {}
    return out

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
    steps = sorted(self._manager.all_steps())
    if not steps:
      return
    latest = steps[-1]
    try:
      saved = self.read_record(latest).get("config")
      problem = None
      diff = config_diff(saved or {}, self.config)
      diff = {k: v for k, v in diff.items()
              if not any(k == f or k.startswith(f + ".") for f in self._ignore)}
      if diff:
        problem = f"a different config:\n{_format_diff(diff)}"
    except CheckpointMismatchError as e:
      problem = str(e)
    if problem is None:
      return
    if not overwrite:
      raise CheckpointMismatchError(
          f"{self.directory} holds checkpoints (steps {steps}) from {problem}\n"
          "Refusing to resume from them or to overwrite them. Use a new directory,"
          " or pass overwrite=True (the trainer's --overwrite) to delete them and"
          " start fresh."
      )
    _log.warning("Deleting checkpoints %s in %s (overwrite=True): %s",
                 steps, self.directory, problem)
    for s in steps:
      self._manager.delete(s)

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


# ---------------------------------------------------------------------------
# PEFT format

ModuleNameMap = Callable[[str, tuple[int, ...]], str]
"""``(our module path, index into its stacked axes) -> HF module name``."""

_LIST_ITEM = re.compile(r"^(.+)_(\d+)$")


def peft_module_name(path: str, index: tuple[int, ...] = ()) -> str:
  """The HF (torch) module name of one of our modules: the default name map.

  * ``/`` becomes ``.``;
  * a component ``<name>_<i>`` (how Flax names the items of a list attribute,
    e.g. ``layers_3``) becomes ``<name>.<i>`` (a torch ``ModuleList`` item);
  * for a kernel stacked by ``nn.scan`` (``index`` has one entry), the layer index
    goes after the component named ``layers``:
    ``("model/layers/self_attn/q_proj", (3,))`` -> ``model.layers.3.self_attn.q_proj``.

  Models named otherwise pass their own ``module_name_map`` to
  :func:`export_peft` / :func:`import_peft` (it may call this one).

  Raises:
    ValueError: a stacked index that this rule cannot place.
  """
  parts = []
  for part in path.split("/"):
    m = _LIST_ITEM.match(part)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else part)
  if index:
    if len(index) != 1 or "layers" not in parts:
      raise ValueError(
          f"The module '{path}' is stacked with index {index}: the default name map"
          " puts one stacked axis after a 'layers' component. Pass module_name_map="
          "lambda path, index: '<hf name>' for this model."
      )
    at = parts.index("layers")
    parts[at] = f"layers.{index[0]}"
  return ".".join(parts)


def _module_kinds(params: Any, paths: Iterable[str]) -> dict[str, str]:
  """``{path: "linear" | "embedding"}`` from the params' weight names."""
  plain = unbox(params)
  modules = dict(iter_modules(plain))
  return {p: ("embedding" if weight_key(modules[p]) == "embedding" else "linear") for p in paths}


def _peft_target_modules(config: LoraConfig, names: Sequence[str]) -> list[str]:
  """PEFT ``target_modules`` that select exactly the exported modules.

  Our suffix list means what PEFT's does, so it is kept (as the exported leaf
  names); a regex, ``"all-linear"`` or exclusions become the full module names.
  """
  spec = config.target_modules
  simple = (
      not isinstance(spec, str)
      and config.exclude_modules is None
      and all("/" not in t and "." not in t for t in spec)
  )
  if simple:
    return sorted({n.rsplit(".", 1)[-1] for n in names})
  return sorted(names)


def _peft_config_json(
    config: LoraConfig, names: Sequence[str], base_model_name_or_path: str | None
) -> dict[str, Any]:
  alpha = config.lora_alpha
  alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "inference_mode": True,
      "r": config.r,
      "lora_alpha": alpha,
      "lora_dropout": config.lora_dropout,
      "target_modules": _peft_target_modules(config, names),
      "exclude_modules": None,
      "fan_in_fan_out": False,
      "bias": "none",
      "lora_bias": False,
      "use_rslora": config.use_rslora,
      "use_dora": config.use_dora,
      "init_lora_weights": config.init_lora_weights,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "layer_replication": None,
      "megatron_config": None,
      "megatron_core": "megatron.core",
      "loftq_config": {},
      "auto_mapping": None,
  }


def _peft_suffixes(kind: str) -> tuple[str, str]:
  if kind == "embedding":
    return "lora_embedding_A", "lora_embedding_B"
  return "lora_A.weight", "lora_B.weight"


_EMBED_HINT = re.compile(r"embed|wte|wpe", re.IGNORECASE)


def peft_state_dict(
    adapters: Mapping,
    *,
    params: Any = None,
    module_name_map: ModuleNameMap | None = None,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
  """The adapters as PEFT's flat ``{key: torch-layout array}`` (numpy).

  See the module docstring for the key names. Stacked adapters are split into
  one module per layer by ``module_name_map`` (default :func:`peft_module_name`).

  Args:
    adapters: the adapters pytree.
    params: the base params; tells ``nn.Embed`` modules (PEFT's
      ``lora_embedding_A/B``) from kernels and checks that the adapters fit.
      Required when a module's name suggests an embedding.
    module_name_map: ``(path, stack index) -> HF module name``.
    dtype: the dtype to write (e.g. ``jnp.bfloat16``); default: the adapters'.
  """
  name_of = module_name_map or peft_module_name
  flat = flatten_adapters(adapters)
  if params is not None:
    check_adapters(params, adapters)
    kinds = _module_kinds(params, flat)
  else:
    hinted = [p for p in flat if _EMBED_HINT.search(p.rsplit("/", 1)[-1])]
    if hinted:
      raise ValueError(
          f"Cannot tell whether {hinted} are embeddings (PEFT names their tensors"
          " lora_embedding_A/B) or kernels: pass params= to export_peft."
      )
    kinds = {p: "linear" for p in flat}
  out: dict[str, np.ndarray] = {}
  owner: dict[str, str] = {}
  for path, adapter in flat.items():
    a, b = _to_host(adapter["lora_a"]), _to_host(adapter["lora_b"])
    m = _to_host(adapter["magnitude"]) if "magnitude" in adapter else None
    stack_shape = a.shape[:-2]
    a_key, b_key = _peft_suffixes(kinds[path])
    for index in np.ndindex(*stack_shape):
      name = name_of(path, tuple(int(i) for i in index))
      if name in owner:
        raise ValueError(
            f"Two modules map to the HF name '{name}': '{owner[name]}' and '{path}'"
            f" (index {index}). Fix module_name_map."
        )
      owner[name] = path
      base = PEFT_PREFIX + name
      out[f"{base}.{a_key}"] = a[index].T
      out[f"{base}.{b_key}"] = b[index].T
      if m is not None:
        out[f"{base}.lora_magnitude_vector"] = m[index]
  cast = (lambda x: x) if dtype is None else (lambda x: x.astype(jnp.dtype(dtype)))
  return {k: np.ascontiguousarray(cast(v)) for k, v in out.items()}


def export_peft(
    directory: PathLike,
    adapters: Mapping,
    config: LoraConfig,
    *,
    params: Any = None,
    module_name_map: ModuleNameMap | None = None,
    base_model_name_or_path: str | None = None,
    dtype: Any = None,
) -> None:
  """Writes a PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

  ``peft.PeftModel.from_pretrained(hf_model, directory)`` loads it (vLLM too, for
  LoRA). Kernels in our layout are ``[I, O]``, so ``lora_A.weight = lora_a.T``
  (``[r, I]``) and ``lora_B.weight = lora_b.T`` (``[O, r]``); DoRA magnitudes
  are ``lora_magnitude_vector`` (``[O]``). Our config also rides in the
  safetensors metadata (``dora_jax.config``) for an exact :func:`import_peft`.
  In several processes every process must call this when the adapters span
  processes (they are gathered); the primary one writes.

  Args:
    directory: output folder (created).
    adapters: the adapters pytree.
    config: their config.
    params: the base params: tells embeddings from kernels, checks the fit.
    module_name_map: ``(our path, stack index) -> HF module name``; default
      :func:`peft_module_name` (``model/layers/self_attn/q_proj`` stacked ->
      ``model.layers.{i}.self_attn.q_proj``).
    base_model_name_or_path: recorded for PEFT (e.g. the HF hub id).
    dtype: dtype of the written tensors (e.g. ``jnp.bfloat16``); default: the
      adapters' dtype.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  tensors = peft_state_dict(adapters, params=params, module_name_map=module_name_map, dtype=dtype)
  names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
  peft_config = _peft_config_json(config, names, base_model_name_or_path)
  if not _is_primary():
    return
  root = _epath(directory)
  root.mkdir(parents=True, exist_ok=True)
  metadata = {
      "format": "pt",
      "dora_jax.config": json.dumps(_config_dict(config), sort_keys=True),
      "dora_jax.version": _version(),
  }
  tmp = root / (PEFT_WEIGHTS_NAME + ".tmp")
  save_file(tensors, str(tmp), metadata=metadata)
  tmp.rename(root / PEFT_WEIGHTS_NAME)
  _write_json_atomic(root / PEFT_CONFIG_NAME, peft_config)


_PEFT_KEY = re.compile(
    r"^(?P<name>.+)\.(?P<what>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?|base_layer\.weight)$"
)


def _parse_peft_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """``{hf module name: {"a", "b"[, "magnitude"], "kind"}}`` from PEFT keys."""
  modules: dict[str, dict[str, Any]] = {}
  unknown, base_weights = [], []
  for key, value in tensors.items():
    m = _PEFT_KEY.match(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else None
    if m is None:
      unknown.append(key)
      continue
    name, what = m.group("name"), m.group("what")
    if what == "base_layer.weight":
      base_weights.append(key)
      continue
    entry = modules.setdefault(name, {})
    if what.startswith("lora_magnitude_vector"):
      entry["magnitude"] = value
      continue
    kind = "embedding" if what.startswith("lora_embedding") else "linear"
    if entry.setdefault("kind", kind) != kind:
      raise ValueError(f"PEFT module '{name}' has both Linear and Embedding LoRA tensors.")
    entry["a" if what in ("lora_A.weight", "lora_embedding_A") else "b"] = value.T
  if unknown:
    raise ValueError(
        f"The PEFT adapter has tensors dora_jax cannot import: {unknown[:10]}"
        f"{' ...' if len(unknown) > 10 else ''} (only LoRA / DoRA on Linear and"
        " Embedding layers, without lora_bias or modules_to_save, is supported)."
    )
  if base_weights:
    warnings.warn(
        f"The PEFT adapter also stores base weights {base_weights}; they are not"
        " imported (only adapters are).",
        stacklevel=3,
    )
  for name, entry in modules.items():
    if "a" not in entry or "b" not in entry:
      raise ValueError(f"PEFT module '{name}' lacks its lora_A or lora_B tensor.")
  return modules


def _name_candidates(
    params: Any,
    module_name_map: ModuleNameMap,
    layouts: Mapping[str, KernelLayout],
) -> dict[str, list[tuple[str, tuple[int, ...], int]]]:
  """``{hf name: [(path, stack index, stack depth)]}`` for every module of ``params``."""
  out: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
  for path, module in iter_modules(unbox(params)):
    shape = tuple(np.shape(module[weight_key(module)]))
    if path in layouts:
      depths = (layouts[path].stack,)
    else:
      depths = (0,) if len(shape) <= 2 or weight_key(module) == "embedding" else (0, 1)
    for depth in depths:
      for index in np.ndindex(*shape[:depth]):
        index = tuple(int(i) for i in index)
        try:
          name = module_name_map(path, index)
        except ValueError:
          continue
        out.setdefault(name, []).append((path, index, depth))
  return out


def _config_from_peft(
    peft_config: Mapping[str, Any], metadata: Mapping[str, str], paths: Sequence[str], dtype
) -> LoraConfig:
  if "dora_jax.config" in metadata:
    config = LoraConfig.from_dict(json.loads(metadata["dora_jax.config"]))
    return dataclasses.replace(config, adapter_dtype=dtype)
  targets = peft_config.get("target_modules")
  if isinstance(targets, (list, tuple)) and not peft_config.get("exclude_modules"):
    target_modules: Any = tuple(targets)
  else:  # A regex over dotted torch names does not carry over: list what was loaded.
    target_modules = tuple(paths)
  init = peft_config.get("init_lora_weights", True)
  return LoraConfig(
      r=int(peft_config["r"]),
      lora_alpha=float(peft_config.get("lora_alpha", peft_config["r"])),
      target_modules=target_modules,
      lora_dropout=float(peft_config.get("lora_dropout", 0.0)),
      use_dora=bool(peft_config.get("use_dora", False)),
      use_rslora=bool(peft_config.get("use_rslora", False)),
      init_lora_weights=init if init in (True, False, "gaussian") else True,
      adapter_dtype=dtype,
  )


def _check_peft_config(peft_config: Mapping[str, Any], directory) -> None:
  problems = []
  if peft_config.get("peft_type") != "LORA":
    problems.append(f"peft_type={peft_config.get('peft_type')!r} (only 'LORA')")
  if peft_config.get("lora_bias"):
    problems.append("lora_bias=True")
  for field in ("rank_pattern", "alpha_pattern"):
    if peft_config.get(field):
      problems.append(f"{field}={peft_config[field]!r} (one r and alpha for all modules only)")
  if peft_config.get("modules_to_save"):
    problems.append(f"modules_to_save={peft_config['modules_to_save']!r}")
  if peft_config.get("layer_replication"):
    problems.append("layer_replication")
  if problems:
    raise ValueError(f"Cannot import the PEFT adapter in {directory}: " + "; ".join(problems) + ".")


def import_peft(
    directory: PathLike,
    params: Any,
    *,
    module_name_map: ModuleNameMap | None = None,
    layouts: Mapping[str, KernelLayout] | None = None,
    dtype: Any = None,
) -> tuple[dict, LoraConfig]:
  """Reads a PEFT LoRA / DoRA adapter into our adapters tree for ``params``.

  Per-layer PEFT modules are stacked when ``params`` holds a scanned kernel
  (``model/layers/...`` with a leading layer axis). Names are matched by
  computing ``module_name_map(path, index)`` for every module of ``params``.

  Args:
    directory: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
    params: the base params (boxed, plain or abstract) the adapters are for.
    module_name_map: as in :func:`export_peft`.
    layouts: ``{path: KernelLayout}`` where a kernel's stacked axes are not the
      default guess (none for 2-D kernels, none or one for 3-D ones).
    dtype: dtype of the returned adapters; default: the file's.

  Returns:
    ``(adapters, config)``. The config is the exporter's exact one when the file
    came from :func:`export_peft`, else built from ``adapter_config.json``.

  Raises:
    ValueError: unsupported PEFT features, modules in the file that ``params``
      lacks, missing layers of a stacked module, or shapes that do not fit.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  root = _epath(directory)
  for fname in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):
    if not (root / fname).exists():
      raise FileNotFoundError(f"{directory} has no {fname}: not a PEFT adapter folder.")
  peft_config = json.loads((root / PEFT_CONFIG_NAME).read_text())
  _check_peft_config(peft_config, directory)
  with safe_open(str(root / PEFT_WEIGHTS_NAME), framework="numpy") as f:
    metadata = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  modules = _parse_peft_tensors(tensors)
  name_map = module_name_map or peft_module_name
  candidates = _name_candidates(params, name_map, dict(layouts or {}))

  missing = sorted(n for n in modules if n not in candidates)
  if missing:
    known = sorted(candidates)[:12]
    raise ValueError(
        f"The PEFT adapter has modules the params lack: {missing[:10]}"
        f"{' ...' if len(missing) > 10 else ''}. The params' modules map to names"
        f" such as {known}; pass module_name_map (or layouts) if the names differ."
    )
  per_path: dict[str, dict[tuple[int, ...], dict[str, Any]]] = {}
  depth_of: dict[str, int] = {}
  for name, entry in modules.items():
    options = candidates[name]
    if len(options) > 1:
      raise ValueError(f"The HF name '{name}' matches several modules: {options}.")
    path, index, depth = options[0]
    if depth_of.setdefault(path, depth) != depth:
      raise ValueError(f"The module '{path}' is matched both stacked and unstacked.")
    per_path.setdefault(path, {})[index] = {**entry, "name": name}

  use_dora = bool(peft_config.get("use_dora", False))
  r = int(peft_config["r"])
  plain = unbox(params)
  modules_by_path = dict(iter_modules(plain))
  flat: dict[str, dict[str, np.ndarray]] = {}
  for path, entries in per_path.items():
    module = modules_by_path[path]
    stack_shape = tuple(np.shape(module[weight_key(module)]))[: depth_of[path]]
    wanted = set(np.ndindex(*stack_shape))
    absent = sorted(wanted - set(entries))
    if absent:
      raise ValueError(
          f"The PEFT adapter adapts only some layers of the stacked module '{path}'"
          f" (stack {stack_shape}): missing indices {absent[:10]}. dora_jax keeps one"
          " adapter per stacked kernel; load into unscanned params instead."
      )
    kind = "embedding" if weight_key(module) == "embedding" else "linear"
    leaves: dict[str, list[np.ndarray]] = {"lora_a": [], "lora_b": [], "magnitude": []}
    for index in sorted(wanted) if stack_shape else [()]:
      e = entries[index]
      if e["kind"] != kind:
        raise ValueError(
            f"PEFT module '{e['name']}' holds {e['kind']} tensors but '{path}' is an"
            f" {'nn.Embed' if kind == 'embedding' else 'kernel'}."
        )
      if e["a"].shape[-1] != r or e["b"].shape[0] != r:
        raise ValueError(
            f"PEFT module '{e['name']}' has rank {e['a'].shape[-1]} / {e['b'].shape[0]},"
            f" but adapter_config.json says r={r}."
        )
      if ("magnitude" in e) != use_dora:
        raise ValueError(
            f"PEFT module '{e['name']}' {'has' if 'magnitude' in e else 'lacks'} a DoRA"
            f" magnitude but use_dora={use_dora}."
        )
      shapes = {k: e[k].shape for k in ("a", "b", "magnitude") if k in e}
      first = entries[min(entries)] if stack_shape else e
      if any(first[k].shape != s for k, s in shapes.items()):
        raise ValueError(
            f"PEFT modules stacked into '{path}' differ in shape: '{first['name']}'"
            f" vs '{e['name']}'."
        )
      leaves["lora_a"].append(e["a"])
      leaves["lora_b"].append(e["b"])
      if "magnitude" in e:
        leaves["magnitude"].append(e["magnitude"])
    flat[path] = {
        k: (np.stack(v).reshape(*stack_shape, *v[0].shape) if stack_shape else v[0])
        for k, v in leaves.items() if v
    }

  adapters_np = unflatten(flat)
  try:
    check_adapters(params, adapters_np)
  except ValueError as e:
    raise ValueError(f"The PEFT adapter in {directory} does not fit the params: {e}") from e
  file_dtype = next(iter(flat.values()))["lora_a"].dtype if flat else np.float32
  out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(file_dtype)
  adapters = jax.tree.map(lambda x: jnp.asarray(x, out_dtype), adapters_np)
  config = _config_from_peft(peft_config, metadata, sorted(flat), out_dtype)
  return adapters, config


__all__ = [
    "CheckpointMismatchError",
    "TrainCheckpointer",
    "config_diff",
    "export_peft",
    "import_peft",
    "load_adapters",
    "params_fingerprint",
    "peft_module_name",
    "peft_state_dict",
    "read_adapter_info",
    "save_adapters",
]
