"""Adapter files: the adapters pytree alone, saved and loaded with Orbax.

:func:`save_adapters` / :func:`load_adapters` write and read the adapters (a few
MB) with Orbax next to a JSON sidecar ``dora_jax.json`` that records the
:class:`~dora_jax.LoraConfig`, the dora_jax version, every adapter leaf's shape
and dtype and (optionally) a fingerprint of the base params. Loading refuses a
checkpoint whose config differs from the expected one or whose shapes do not fit
the given params, and can place each array directly with a ``jax.sharding``
(save on one mesh, restore on another).

The config matters as much as the arrays: ``lora_alpha``, ``use_rslora`` (the
scale) cannot be read back from the arrays, so apply loaded adapters with the
config :func:`load_adapters` returns (the saved one).

HF PEFT's format lives in :mod:`dora_jax.peft_format`; the trainer's resumable
state (adapters + optimizer + step + RNG + data position) in ``train.checkpoint``.
The small helpers here (absolute ``epath`` paths, atomic JSON, config diffs) are
shared with both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.config import LoraConfig, config_from_dict
from dora_jax.tree import check_adapters, check_config_matches, flatten_adapters, unbox, unflatten
from dora_jax.variants import SHARED_KEY
from dora_jax.variants import vera

PathLike = Any  # str, os.PathLike or etils.epath.Path (gs:// paths work through Orbax)
Sharding = jax.sharding.Sharding

SIDECAR_NAME = "dora_jax.json"
"""The JSON file next to an adapter-only checkpoint."""
ADAPTERS_SUBDIR = "adapters"
"""The Orbax directory of an adapter-only checkpoint."""
FORMAT_VERSION = 1


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
  """Writes ``obj`` as JSON to ``path`` via a temporary file and a replacing rename
  (an existing ``path`` is replaced whole; a kill leaves the old file or the new)."""
  tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path)


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
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
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
  """``{path: {leaf: {"shape": [...], "dtype": name}}}`` of an adapters tree (the shared
  leaves, VeRA's projections, under the path ``"shared"``)."""
  groups = dict(flatten_adapters(adapters))
  if isinstance(adapters, Mapping) and SHARED_KEY in adapters:
    groups[SHARED_KEY] = dict(adapters[SHARED_KEY])
  return {
      path: {
          k: {"shape": list(np.shape(v)), "dtype": jnp.dtype(v.dtype).name}
          for k, v in sorted(leaves.items())
      }
      for path, leaves in groups.items()
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
        " dora_jax.import_peft, for a trainer checkpoint train.checkpoint.TrainCheckpointer)."
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
    ValueError: ``params`` given and the adapters do not fit them, or ``config.use_dora``
      disagrees with the adapters (DoRA adapters have a ``magnitude``).
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
  check_config_matches(adapters, config)
  if params is not None:
    check_adapters(params, adapters)
  regenerate = _projections_regenerable(adapters, config)
  info = {
      "format": "dora_jax.adapters",
      "format_version": FORMAT_VERSION,
      "dora_jax_version": _version(),
      "config": _config_dict(config),
      "method": config.variant.name,
      "step": None if step is None else int(step),
      "metadata": json.loads(json.dumps(dict(metadata or {}))),
      "adapters": _adapter_manifest(adapters),
      "base_fingerprint": None if params is None else params_fingerprint(params),
      "projections_regenerated": regenerate,
  }
  # The sidecar goes first and comes back last: a crash in between leaves a
  # directory that load_adapters refuses rather than one with mismatched halves.
  if _is_primary():
    root.mkdir(parents=True, exist_ok=True)
    if sidecar.exists():
      sidecar.unlink()
  # Nested dicts (no '/' in Orbax's names), adapter leaves only.
  tree = unflatten({path: dict(leaves) for path, leaves in flatten_adapters(adapters).items()})
  if isinstance(adapters, Mapping) and SHARED_KEY in adapters and not regenerate:
    tree[SHARED_KEY] = dict(adapters[SHARED_KEY])  # VeRA's projections (save_projection=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, tree, force=overwrite)
    ckptr.wait_until_finished()
  if _is_primary():
    _write_json_atomic(sidecar, info)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("dora_jax.save_adapters")


def _projections_regenerable(adapters: Mapping, config: Any) -> bool:
  """Whether VeRA's shared projections are left out of the files (``save_projection=False``).

  They are re-drawn from ``projection_prng_key`` on load, so they are left out only after
  checking that the re-draw gives them back bit for bit.

  Raises:
    ValueError: ``save_projection=False`` but the projections are not the draw of
      ``projection_prng_key`` (e.g. imported from PEFT, whose torch generator JAX cannot
      reproduce): leaving them out would lose them.
  """
  if getattr(config, "save_projection", True) or SHARED_KEY not in adapters:
    return False
  shared = adapters[SHARED_KEY]
  redrawn = _redraw_projections(config, {k: np.shape(v) for k, v in shared.items()})
  if any(not np.array_equal(np.asarray(_to_host(shared[k]), np.float32), redrawn[k]) for k in shared):
    raise ValueError(
        "save_projection=False, but these VeRA projections are not the draw of"
        f" projection_prng_key={config.projection_prng_key} (imported from PEFT, or changed):"
        " leaving them out would lose them; save with save_projection=True.")
  return True


def _redraw_projections(config: Any, shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
  """VeRA's shared projections drawn from ``config.projection_prng_key`` in the saved shapes."""
  i_max, o_max = shapes[vera.PROJECTION_A][0], shapes[vera.PROJECTION_B][1]
  return {k: np.asarray(v) for k, v in vera.init_shared(i_max, o_max, config).items()}


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
    saved config. Apply them with that config: its ``lora_alpha`` and
    ``use_rslora`` (the scale) cannot be read from the arrays, so adapters run
    with another alpha would compute another model without any error.

  Raises:
    FileNotFoundError: not a dora_jax adapter checkpoint.
    CheckpointMismatchError: the saved config differs from ``config`` (the message
      names the fields), or the adapters do not fit ``params`` (it names the path).
  """
  info = read_adapter_info(directory)
  saved_config = config_from_dict(info["config"], info.get("method", "lora"))
  if config is not None:
    diff = config_diff(info["config"], _config_dict(config))
    if diff:
      raise CheckpointMismatchError(
          f"The adapters in {directory} were saved with a different config:\n"
          f"{_format_diff(diff)}\nPass the matching config, or config=None to take"
          " the saved one."
      )
  manifest = info["adapters"]
  try:
    check_config_matches(manifest, saved_config)
  except ValueError as e:
    raise CheckpointMismatchError(f"{directory}: the sidecar contradicts itself: {e}") from e
  leaf_shardings = _leaf_shardings(shardings, manifest)
  regenerated = info.get("projections_regenerated", False)
  abstract = unflatten({
      path: {
          k: jax.ShapeDtypeStruct(
              tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=leaf_shardings[path][k]
          )
          for k, spec in leaves.items()
      }
      for path, leaves in manifest.items()
      if not (regenerated and path == SHARED_KEY)
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
  if regenerated:  # save_projection=False: re-drawn from projection_prng_key, as PEFT does
    shared = manifest[SHARED_KEY]
    redrawn = _redraw_projections(saved_config, {k: v["shape"] for k, v in shared.items()})
    restored[SHARED_KEY] = {
        k: jax.device_put(redrawn[k].astype(shared[k]["dtype"]), leaf_shardings[SHARED_KEY][k])
        for k in shared}
  return restored, saved_config


__all__ = [
    "CheckpointMismatchError",
    "config_diff",
    "load_adapters",
    "params_fingerprint",
    "read_adapter_info",
    "save_adapters",
]
