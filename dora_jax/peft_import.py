"""Reading HF PEFT's adapter folder into our adapters tree: :func:`import_peft`, re-exported
by :mod:`dora_jax.peft_format` (the format's description and the list of its modules)."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import peft_tensors as pt
from dora_jax.checkpoint import PathLike, _epath
from dora_jax.peft_config import check_peft_config, config_from_peft
from dora_jax.peft_names import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, ModuleNameMap, peft_module_name
from dora_jax.tree import (
    KernelLayout,
    check_adapters,
    iter_modules,
    unbox,
    unflatten,
    weight_key,
)
from dora_jax.variants import SHARED_KEY


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


def _check_finite(tensors: Mapping[str, np.ndarray], directory) -> None:
  """Raises ``ValueError`` naming the tensors that hold NaN or infinite values."""
  bad = [k for k, v in sorted(tensors.items())
         if not (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_)
         and not np.isfinite(np.asarray(v, np.float32)).all()]
  if bad:
    raise ValueError(
        f"The PEFT adapter in {directory} has NaN or infinite values in {bad[:10]}"
        f"{' ...' if len(bad) > 10 else ''}: it would make every output NaN. Re-export it from"
        " a run whose loss stayed finite."
    )


def _listed_without_tensors(
    peft_config: Mapping[str, Any],
    candidates: Mapping[str, list[tuple[str, tuple[int, ...], int]]],
    present: Mapping[str, Any],
) -> list[str]:
  """HF names of the params' modules that ``target_modules`` selects (PEFT's rule: the name
  or a ``.``-suffix of it equals a listed entry) but that have no tensor in the file.

  Only a list of ``target_modules`` without ``layers_to_transform`` or ``exclude_modules``
  is checked (a regex or a layer subset says less about what must be there).
  """
  targets = peft_config.get("target_modules")
  if (not isinstance(targets, (list, tuple)) or peft_config.get("layers_to_transform") is not None
      or peft_config.get("exclude_modules")):
    return []

  def listed(name: str) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)

  names_of: dict[str, list[str]] = {}  # one module path can have several names (stacked or not)
  for name, options in candidates.items():
    for path, _, _ in options:
      names_of.setdefault(path, []).append(name)
  absent = []
  for names in names_of.values():
    wanted = sorted(n for n in names if listed(n))
    if wanted and not any(n in present for n in names):
      absent.append(wanted[0])
  return sorted(absent)




def import_peft(
    directory: PathLike,
    params: Any,
    *,
    module_name_map: ModuleNameMap | None = None,
    layouts: Mapping[str, KernelLayout] | None = None,
    dtype: Any = None,
) -> tuple[dict, Any]:
  """Reads a PEFT LoRA / DoRA / VeRA adapter into our adapters tree for ``params``.

  Per-layer PEFT modules are stacked when ``params`` holds a scanned kernel
  (``model/layers/...`` with a leading layer axis). Names are matched by
  computing ``module_name_map(path, index)`` for every module of ``params``. Conv
  tensors (``lora_A.weight [r, C_in, *k]``) are recognized by their shape and
  rearranged for the Flax kernel ``[*k, C_in, C_out]``; VeRA's shared projections land
  in ``adapters["shared"]`` (``vera_A [I_max, r]``, ``vera_B [r, O_max]``, float32).

  Args:
    directory: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
    params: the base params (boxed, plain or abstract) the adapters are for.
    module_name_map: as in :func:`export_peft`.
    layouts: ``{path: KernelLayout}`` where a kernel's stacked axes are not the
      default guess (none for 2-D kernels, none or one for 3-D ones).
    dtype: dtype of the returned adapters; default: the file's.

  Returns:
    ``(adapters, config)``. The config is the exporter's exact one when the file
    came from :func:`export_peft`, else built from ``adapter_config.json``
    (:class:`LoraConfig` or :class:`VeraConfig`).

  Raises:
    ValueError: unsupported PEFT features (e.g. VeRA saved with
      ``save_projection=False``: torch's generator cannot be reproduced), modules in the
      file that ``params`` lacks, modules that ``adapter_config.json``'s
      ``target_modules`` lists (and ``params`` has) without tensors in the file, missing
      layers of a stacked module, NaN or infinite values, a grouped conv's adapter, or
      shapes that do not fit.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  root = _epath(directory)
  for fname in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):
    if not (root / fname).exists():
      raise FileNotFoundError(f"{directory} has no {fname}: not a PEFT adapter folder.")
  peft_config = json.loads((root / PEFT_CONFIG_NAME).read_text())
  check_peft_config(peft_config, directory)
  with safe_open(str(root / PEFT_WEIGHTS_NAME), framework="numpy") as f:
    metadata = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  _check_finite(tensors, directory)
  modules, shared_file = pt.parse_peft_tensors(tensors)
  is_vera = peft_config.get("peft_type") == "VERA"
  if is_vera and sorted(shared_file) != ["vera_A", "vera_B"]:
    raise ValueError(
        f"The VeRA adapter in {directory} lacks {pt.VERA_A_KEY} / {pt.VERA_B_KEY}: PEFT re-draws"
        " them from projection_prng_key with torch's generator, which JAX cannot reproduce."
        " Save it with save_projection=True.")
  name_map = module_name_map or peft_module_name
  candidates = _name_candidates(params, name_map, dict(layouts or {}))
  absent = _listed_without_tensors(peft_config, candidates, modules)
  if absent:
    raise ValueError(
        f"The PEFT adapter in {directory} is incomplete: adapter_config.json's target_modules"
        f" {peft_config.get('target_modules')} select {absent[:10]}{' ...' if len(absent) > 10 else ''}"
        f" in the params, but {PEFT_WEIGHTS_NAME} has no tensors for them. Re-export the"
        " adapter, or fix target_modules to list only what was adapted."
    )

  if peft_config.get("ensure_weight_tying"):
    pt.drop_tied_heads(modules, candidates)
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
    full_shape = tuple(np.shape(module[weight_key(module)]))
    stack_shape = full_shape[: depth_of[path]]
    wanted = set(np.ndindex(*stack_shape))
    absent = sorted(wanted - set(entries))
    if absent:
      raise ValueError(
          f"The PEFT adapter adapts only some layers of the stacked module '{path}'"
          f" (stack {stack_shape}): missing indices {absent[:10]}. dora_jax keeps one"
          " adapter per stacked kernel; load into unscanned params instead."
      )
    is_embed = weight_key(module) == "embedding"
    leaves: dict[str, list[np.ndarray]] = {}
    for index in sorted(wanted) if stack_shape else [()]:
      e = entries[index]
      if (e["kind"] == "embedding") != is_embed:
        raise ValueError(
            f"PEFT module '{e['name']}' holds {e['kind']} tensors but '{path}' is an"
            f" {'nn.Embed' if is_embed else 'kernel'}."
        )
      if is_vera:
        if "A" in e:
          raise ValueError(f"PEFT module '{e['name']}' holds LoRA tensors in a VeRA adapter.")
        got = {"vera_lambda_d": e["vera_lambda_d"], "vera_lambda_b": e["vera_lambda_b"]}
        ranks = (got["vera_lambda_d"].shape[-1],)
      else:
        if "A" not in e:
          raise ValueError(f"PEFT module '{e['name']}' holds VeRA tensors in a LoRA adapter.")
        got = pt.lora_from_peft(e["kind"], e, full_shape[depth_of[path]:], e["name"])
        ranks = (got["lora_a"].shape[-1], got["lora_b"].shape[0])
      want_r = _pattern_rank(peft_config, e["name"], r)
      if any(k != want_r for k in ranks):
        raise ValueError(
            f"PEFT module '{e['name']}' has rank {' / '.join(map(str, ranks))},"
            f" but adapter_config.json says r={want_r} for it."
        )
      if ("magnitude" in e) != use_dora:
        raise ValueError(
            f"PEFT module '{e['name']}' {'has' if 'magnitude' in e else 'lacks'} a DoRA"
            f" magnitude but use_dora={use_dora}."
        )
      for k, v in got.items():
        if leaves.get(k) and leaves[k][0].shape != v.shape:
          raise ValueError(
              f"PEFT modules stacked into '{path}' differ in shape: '{entries[min(entries)]['name']}'"
              f" vs '{e['name']}'."
          )
        leaves.setdefault(k, []).append(v)
    flat[path] = {
        k: (np.stack(v).reshape(*stack_shape, *v[0].shape) if stack_shape else v[0])
        for k, v in leaves.items()
    }

  adapters_np = unflatten(flat)
  try:
    fits = check_adapters(params, adapters_np)
  except ValueError as e:
    raise ValueError(f"The PEFT adapter in {directory} does not fit the params: {e}") from e
  first = next(iter(flat.values())) if flat else {}
  file_dtype = next(iter(first.values())).dtype if first else np.float32
  out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(file_dtype)
  adapters = jax.tree.map(lambda x: jnp.asarray(x, out_dtype), adapters_np)
  if is_vera:
    shared = {"vera_A": shared_file["vera_A"].T, "vera_B": shared_file["vera_B"].T}
    for path, fit in fits.items():
      module = modules_by_path[path]
      i_dim, o_dim = fit.matrix_shape(tuple(np.shape(module[weight_key(module)])))[-2:]
      if shared["vera_A"].shape[0] < i_dim or shared["vera_B"].shape[1] < o_dim:
        raise ValueError(
            f"The VeRA projections in {directory} (vera_A {shared_file['vera_A'].shape}, vera_B"
            f" {shared_file['vera_B'].shape}) are smaller than '{path}' ({i_dim} x {o_dim}):"
            " the adapter was made for another model.")
    adapters[SHARED_KEY] = {k: jnp.asarray(v, jnp.float32) for k, v in shared.items()}
  config = config_from_peft(peft_config, metadata, sorted(flat), out_dtype)
  return adapters, config


def _pattern_rank(peft_config: Mapping[str, Any], name: str, r: int) -> int:
  """A module's rank under PEFT's ``rank_pattern`` (``tuners/tuners_utils.py``: the first key
  matching ``(.*\.)?key$`` of the dotted module name), else ``r``."""
  for key, value in (peft_config.get("rank_pattern") or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return int(value)
  return r
