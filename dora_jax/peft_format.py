"""HF PEFT's on-disk adapter format: export and import.

:func:`export_peft` / :func:`import_peft` write and read ``adapter_config.json`` +
``adapter_model.safetensors``, the folder that ``peft.PeftModel.from_pretrained``
(and vLLM, for LoRA) load.

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
import json
import os
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.checkpoint import (
    PathLike,
    _config_dict,
    _epath,
    _is_primary,
    _to_host,
    _version,
    _write_json_atomic,
)
from dora_jax.config import LoraConfig
from dora_jax.tree import (
    KernelLayout,
    check_adapters,
    check_config_matches,
    flatten_adapters,
    iter_modules,
    unbox,
    unflatten,
    weight_key,
)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

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
    config: LoraConfig, names: Sequence[str], base_model_name_or_path: str | None,
    task_type: str | None = None,
) -> dict[str, Any]:
  alpha = config.lora_alpha
  alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
  return {
      "peft_type": "LORA",
      "task_type": task_type,
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
    task_type: str | None = None,
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

  Exporting again into the same folder replaces both files, each atomically
  (a temporary file, then a replacing rename); temporary files that an export
  killed midway left there are removed first.

  Args:
    directory: output folder (created).
    adapters: the adapters pytree.
    config: their config.
    params: the base params: tells embeddings from kernels, checks the fit.
    module_name_map: ``(our path, stack index) -> HF module name``; default
      :func:`peft_module_name` (``model/layers/self_attn/q_proj`` stacked ->
      ``model.layers.{i}.self_attn.q_proj``).
    base_model_name_or_path: recorded for PEFT (e.g. the HF hub id).
    task_type: PEFT's ``task_type`` (``"CAUSAL_LM"`` for a causal LM, so that
      ``PeftModel.from_pretrained`` makes a ``PeftModelForCausalLM``); default ``None``:
      a plain ``PeftModel``, which any model (a CNN, an encoder) loads.
    dtype: dtype of the written tensors (e.g. ``jnp.bfloat16``); default: the
      adapters' dtype.

  Raises:
    ValueError: ``config.use_dora`` disagrees with the adapters, or (with
      ``params``) the adapters do not fit them.
  """
  if not isinstance(config, LoraConfig):
    what = "DVoRA" if getattr(config, "use_dora", False) else type(config).__name__
    raise ValueError(
        f"export_peft writes LoRA/DoRA adapters; {what} adapters have no PEFT export here"
        + (" (PEFT has no DVoRA)" if what == "DVoRA" else " yet")
        + ": export the merged weights instead (dora_jax.merge, or the trainer's --export merged).")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  check_config_matches(adapters, config)
  tensors = peft_state_dict(adapters, params=params, module_name_map=module_name_map, dtype=dtype)
  names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
  peft_config = _peft_config_json(config, names, base_model_name_or_path, task_type)
  if not _is_primary():
    return
  root = _epath(directory)
  root.mkdir(parents=True, exist_ok=True)
  for name in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME):  # left by an export that was killed
    for stale in root.glob(f"{name}.tmp*"):
      stale.unlink()
  metadata = {
      "format": "pt",
      "dora_jax.config": json.dumps(_config_dict(config), sort_keys=True),
      "dora_jax.version": _version(),
  }
  tmp = root / f"{PEFT_WEIGHTS_NAME}.tmp-{os.getpid()}"
  save_file(tensors, str(tmp), metadata=metadata)
  tmp.replace(root / PEFT_WEIGHTS_NAME)
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
      lacks, modules that ``adapter_config.json``'s ``target_modules`` lists (and
      ``params`` has) without tensors in the file, missing layers of a stacked
      module, NaN or infinite values, or shapes that do not fit.
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
  _check_finite(tensors, directory)
  modules = _parse_peft_tensors(tensors)
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
    "ModuleNameMap",
    "export_peft",
    "import_peft",
    "peft_module_name",
    "peft_state_dict",
]
