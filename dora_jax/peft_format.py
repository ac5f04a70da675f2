"""HF PEFT's on-disk adapter format: export and import.

:func:`export_peft` / :func:`import_peft` write and read ``adapter_config.json`` +
``adapter_model.safetensors``, the folder that ``peft.PeftModel.from_pretrained``
(and vLLM, for LoRA) load: LoRA and DoRA on Linear, Embedding and Conv 1-D/2-D/3-D
layers, and VeRA on Linear layers. The tensor layouts per layer type are in
:mod:`dora_jax.peft_tensors`, ``adapter_config.json`` in :mod:`dora_jax.peft_config`.

Keys (checked against ``peft`` 0.21 ``save_pretrained`` output and
``peft/utils/save_and_load.py``), for a module named ``<name>`` in the HF model:
``base_model.model.<name>.lora_A.weight`` / ``lora_B.weight`` (Linear, Conv),
``.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding), ``.lora_magnitude_vector``
(DoRA), ``.vera_lambda_d`` / ``.vera_lambda_b`` (VeRA), and VeRA's shared
``base_model.vera_A`` / ``base_model.vera_B``.

(PEFT keeps DoRA's magnitude in a ``DoraLinearLayer`` whose parameter is
``lora_magnitude_vector.<adapter>.weight``; ``get_peft_model_state_dict`` strips the
``.weight`` and the adapter name when saving, and ``set_peft_model_state_dict``
puts them back.)

Not exported (refused with a message): DVoRA (PEFT has no DVoRA), grouped convs (PEFT's
grouped-conv LoRA is another parameterization), other layer kinds, VeRA on non-Linear
layers, and DoRA on an embedding that is also the LM head. A LoRA on a tied embedding is
exported with PEFT's ``ensure_weight_tying`` (see :func:`export_peft`, ``tied_embeddings``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import peft_tensors as pt
from dora_jax import variants
from dora_jax.checkpoint import (
    PathLike,
    _config_dict,
    _epath,
    _is_primary,
    _to_host,
    _version,
    _write_json_atomic,
)
from dora_jax.config import LoraConfig, VeraConfig
from dora_jax.peft_config import check_peft_config, config_from_peft, peft_config_json
from dora_jax.tree import (
    KernelLayout,
    check_adapters,
    check_config_matches,
    flatten_adapters,
    iter_modules,
    shared_leaves,
    unbox,
    unflatten,
    weight_key,
)
from dora_jax.variants import SHARED_KEY

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = pt.PEFT_PREFIX

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



_EMBED_HINT = re.compile(r"embed|wte|wpe", re.IGNORECASE)


def _export_kinds(params: Any, adapters: Mapping, layouts: Mapping[str, KernelLayout] | None
                  ) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, int]]:
  """``({path: "linear" | "embedding" | "conv"}, {path: unstacked kernel shape}, {path: I})``.

  Raises:
    ValueError: a grouped conv; a kernel with several input axes and one output axis
      without ``layouts`` (a Conv and a ``DenseGeneral`` look alike).
  """
  fits = check_adapters(params, adapters)
  modules = dict(iter_modules(unbox(params)))
  layouts = dict(layouts or {})
  kinds, shapes, inputs = {}, {}, {}
  for path, fit in fits.items():
    module = modules[path]
    shape = tuple(np.shape(module[weight_key(module)]))
    rest = shape[fit.stack:]
    shapes[path], inputs[path] = rest, fit.matrix_shape(shape)[-2]
    given = layouts[path].kind if path in layouts else None
    if weight_key(module) == "embedding":
      kinds[path] = "embedding"
    elif given == "grouped_conv":
      raise ValueError(
          f"'{path}' is a grouped conv (feature_group_count > 1): PEFT's LoRA/DoRA on a grouped"
          " conv is another parameterization (full lora_A, grouped lora_B) that our adapter"
          " cannot be written as. Export the merged weights instead, or exclude the module.")
    elif given == "conv":
      if fit.inputs != len(rest) - 1:
        raise ValueError(f"The conv kernel at '{path}' {shape} does not split as [*k, C_in, C_out].")
      kinds[path] = "conv"
    elif given not in (None, "linear"):
      raise ValueError(f"'{path}' is a {given} layer, which has no PEFT tensor layout here"
                       " (Linear, Embedding and Conv only): export the merged weights instead.")
    elif given is None and len(rest) >= 3 and fit.inputs == len(rest) - 1:
      raise ValueError(
          f"The kernel at '{path}' has shape {shape}: a Conv ([*k, C_in, C_out], PEFT layout"
          " [r, C_in, *k]) or a DenseGeneral over several input axes (PEFT layout [r, I])."
          " Pass layouts=dora_jax.kernel_layouts(model, *example_inputs) to export_peft.")
    else:
      kinds[path] = "linear"
  return kinds, shapes, inputs


def peft_state_dict(
    adapters: Mapping,
    *,
    params: Any = None,
    module_name_map: ModuleNameMap | None = None,
    dtype: Any = None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, np.ndarray]:
  """The adapters as PEFT's flat ``{key: torch-layout array}`` (numpy).

  See :mod:`dora_jax.peft_tensors` for the names and layouts. Stacked adapters are
  split into one module per layer by ``module_name_map`` (default :func:`peft_module_name`).

  Args:
    adapters: the adapters pytree (LoRA / DoRA, or VeRA with ``adapters["shared"]``).
    params: the base params; tells ``nn.Embed`` modules (PEFT's
      ``lora_embedding_A/B``) from kernels, gives conv kernels' shapes and checks that
      the adapters fit. Required when a module's name suggests an embedding.
    module_name_map: ``(path, stack index) -> HF module name``.
    dtype: the dtype to write (e.g. ``jnp.bfloat16``); default: the adapters'.
    layouts: ``{path: KernelLayout}`` as from :func:`dora_jax.kernel_layouts`; its
      ``kind="conv"`` marks Conv kernels (needed for kernels with several input axes).

  Raises:
    ValueError: see :func:`export_peft`.
  """
  name_of = module_name_map or peft_module_name
  flat = flatten_adapters(adapters)
  inputs: dict[str, int] = {}
  if params is not None:
    kinds, shapes, inputs = _export_kinds(params, adapters, layouts)
  else:
    hinted = [p for p in flat if _EMBED_HINT.search(p.rsplit("/", 1)[-1])]
    if hinted:
      raise ValueError(
          f"Cannot tell whether {hinted} are embeddings (PEFT names their tensors"
          " lora_embedding_A/B) or kernels: pass params= to export_peft.")
    if any(l.kind == "conv" for l in (layouts or {}).values()):
      raise ValueError("Conv adapters need the kernels' shapes: pass params= to export_peft.")
    kinds, shapes = {p: "linear" for p in flat}, {p: () for p in flat}
  out: dict[str, np.ndarray] = {}
  owner: dict[str, str] = {}
  o_max = 0
  for path, adapter in flat.items():
    method = variants.adapter_variant(adapter, path).name
    host = {k: _to_host(v) for k, v in adapter.items()}
    if method == "vera" and "magnitude" in host:
      raise ValueError(_DVORA_MESSAGE)
    if method not in ("lora", "vera"):
      raise ValueError(f"'{path}' holds {method} adapters, which have no PEFT export here.")
    stack_shape = host["lora_a"].shape[:-2] if method == "lora" else host["vera_lambda_d"].shape[:-1]
    for index in np.ndindex(*stack_shape):
      name = name_of(path, tuple(int(i) for i in index))
      if name in owner:
        raise ValueError(
            f"Two modules map to the HF name '{name}': '{owner[name]}' and '{path}'"
            f" (index {index}). Fix module_name_map.")
      owner[name] = path
      if method == "lora":
        m = host["magnitude"][index] if "magnitude" in host else None
        tensors = pt.lora_to_peft(kinds[path], host["lora_a"][index], host["lora_b"][index], m,
                                  shapes[path])
      else:
        tensors = pt.vera_to_peft(kinds[path], host["vera_lambda_d"][index],
                                  host["vera_lambda_b"][index], path)
        o_max = max(o_max, host["vera_lambda_b"].shape[-1])
      out.update({f"{PEFT_PREFIX}{name}.{suffix}": v for suffix, v in tensors.items()})
  shared = shared_leaves(adapters)
  if o_max:
    i_max = max(inputs.values()) if inputs else None
    out.update(pt.vera_projections_to_peft({k: _to_host(v) for k, v in shared.items()}, i_max, o_max))
  cast = (lambda x: x) if dtype is None else (lambda x: x.astype(jnp.dtype(dtype)))
  return {k: np.ascontiguousarray(cast(v)) for k, v in out.items()}


_DVORA_MESSAGE = (
    "export_peft cannot write DVoRA adapters (VeRA with use_dora=True): PEFT has no DVoRA."
    " Export the merged weights instead (dora_jax.merge, or the trainer's --export merged).")


def tied_dora_message(paths: Any, fix: str = (
    "Export the merged weights, leave the embedding out of target_modules, or pass"
    " tied_embeddings=False if the embedding is not the head.")) -> str:
  """Why DoRA on an embedding that is also the LM head has no PEFT export (one line), and
  ``fix``: what to do instead."""
  return (f"{paths} put DoRA on an embedding that the model also uses as its LM head (the params"
          " have no lm_head): PEFT has no equivalent (its DoRA on the head normalizes the other"
          f" axis). {fix}")


def _tied_embedding_paths(params: Any, adapters: Mapping, force: bool = False) -> list[str]:
  """Adapted ``nn.Embed`` modules that are (most likely, or with ``force``) also the LM head
  (``attend``): the params have no separate ``lm_head`` module."""
  modules = dict(iter_modules(unbox(params)))
  has_head = any(p == "lm_head" or p.endswith("/lm_head") for p in modules)
  return [p for p in flatten_adapters(adapters)
          if p in modules and weight_key(modules[p]) == "embedding" and (force or not has_head)]


def export_peft(
    directory: PathLike,
    adapters: Mapping,
    config: LoraConfig | VeraConfig,
    *,
    params: Any = None,
    module_name_map: ModuleNameMap | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    dtype: Any = None,
    layouts: Mapping[str, KernelLayout] | None = None,
    tied_embeddings: bool | None = None,
    tied_head_name: str = "lm_head",
    initial_adapters: Mapping | None = None,
) -> None:
  """Writes a PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

  ``peft.PeftModel.from_pretrained(hf_model, directory)`` loads it (vLLM too, for
  LoRA). Kernels in our layout are ``[I, O]``, so ``lora_A.weight = lora_a.T``
  (``[r, I]``) and ``lora_B.weight = lora_b.T`` (``[O, r]``); DoRA magnitudes
  are ``lora_magnitude_vector`` (``[O]``); embeddings and convs have PEFT's own
  layouts (:mod:`dora_jax.peft_tensors`). VeRA (``VeraConfig``, ``use_dora=False``)
  writes ``vera_lambda_d/b`` per module and the shared projections
  ``base_model.vera_A [r, I_max]`` / ``vera_B [O_max, r]`` — always, whatever
  ``save_projection`` says: PEFT would re-draw missing ones with torch's generator,
  which JAX's numbers differ from (``adapter_config.json`` says ``save_projection: true``).
  Our config also rides in the safetensors metadata (``dora_jax.config``) for an exact
  :func:`import_peft`. In several processes every process must call this when the
  adapters span processes (they are gathered); the primary one writes.

  Tied embeddings: our adapter on an ``nn.Embed`` that the model also uses as its LM
  head (``attend``) changes both the lookup and the head (``W'`` is one tensor). PEFT
  applies an embedding adapter to the lookup only, unless ``ensure_weight_tying=True``
  (PEFT 0.21 ``LoraConfig``), which gives the head a LoRA tied to the embedding's
  (``lm_head.lora_A.weight = lora_embedding_B.T``, ``lora_B.weight = lora_embedding_A.T``):
  the same ``ΔW`` on both, our semantics. So a tied LoRA embedding is exported with
  ``ensure_weight_tying: true`` and the head's tensors (named ``tied_head_name``); DoRA
  on a tied embedding is refused (PEFT's DoRA on the head would normalize each vocab
  row over D, ours normalizes each of D over the vocab: no PEFT equivalent), as is
  VeRA (Linear only). ``tied_embeddings=None`` (default) counts an adapted ``nn.Embed``
  as tied when the params have no ``lm_head`` module; pass ``False`` when the embedding
  is not the head although there is no ``lm_head`` (or ``True`` to force it).

  Exporting again into the same folder replaces both files, each atomically
  (a temporary file, then a replacing rename); temporary files that an export
  killed midway left there are removed first.

  Args:
    directory: output folder (created).
    adapters: the adapters pytree.
    config: their config (:class:`LoraConfig`, or :class:`VeraConfig` without DoRA).
    params: the base params: tells embeddings from kernels, gives conv shapes, checks the fit.
    module_name_map: ``(our path, stack index) -> HF module name``; default
      :func:`peft_module_name` (``model/layers/self_attn/q_proj`` stacked ->
      ``model.layers.{i}.self_attn.q_proj``).
    base_model_name_or_path: recorded for PEFT (e.g. the HF hub id).
    task_type: PEFT's ``task_type`` (``"CAUSAL_LM"`` for a causal LM, so that
      ``PeftModel.from_pretrained`` makes a ``PeftModelForCausalLM``); default ``None``:
      a plain ``PeftModel``, which any model (a CNN, an encoder) loads.
    dtype: dtype of the written tensors (e.g. ``jnp.bfloat16``); default: the
      adapters' dtype.
    layouts: ``{path: KernelLayout}`` (:func:`dora_jax.kernel_layouts`): marks conv
      kernels (``kind="conv"``; ``"grouped_conv"`` is refused).
    tied_embeddings: whether adapted embeddings are also the LM head (see above).
    tied_head_name: the HF module name of the tied head (``"lm_head"`` in HF causal LMs).
    initial_adapters: for PiSSA / OLoRA adapters (trained on the residual base
      ``W0 − s·A0 B0``), the adapters :func:`dora_jax.init_adapters_and_base` returned: the
      export is then a plain LoRA of rank ``2r`` for the ORIGINAL base (``ΔW = s·(A B − A0
      B0)``, ``r`` / ``lora_alpha`` / pattern values doubled, ``init_lora_weights: true``), as
      PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` writes it
      (:mod:`dora_jax.residual`; DoRA keeps its trained magnitude, which PEFT's drops).

  Raises:
    ValueError: DVoRA (PEFT has none); ``config`` disagrees with the adapters; (with
      ``params``) the adapters do not fit them; a grouped conv; a kernel with several
      input axes and no ``layouts``; VeRA on a non-Linear layer; DoRA on a tied embedding;
      PiSSA / OLoRA adapters without ``initial_adapters`` (or ``initial_adapters`` for others).
  """
  if getattr(config, "use_dora", False) and isinstance(config, VeraConfig):
    raise ValueError(_DVORA_MESSAGE)
  if not isinstance(config, (LoraConfig, VeraConfig)):
    raise ValueError(
        f"export_peft writes LoRA/DoRA and VeRA adapters; {type(config).__name__} adapters have"
        " no PEFT export here: export the merged weights instead (dora_jax.merge).")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  check_config_matches(adapters, config)
  if initial_adapters is not None or getattr(config, "modifies_base", False):
    if initial_adapters is None:
      raise ValueError(
          f"These adapters (init_lora_weights={config.init_lora_weights!r}) were trained on the"
          " residual base W0 - s·A0 B0: pass initial_adapters=<the adapters"
          " init_adapters_and_base returned> to export a LoRA of rank 2r for the original base"
          " (PEFT's path_initial_model_for_weight_conversion), or, to ship them with the residual"
          " params, export with dataclasses.replace(config, init_lora_weights=True).")
    from dora_jax import residual  # pylint: disable=g-import-not-at-top

    adapters, config = residual.convert_to_lora(adapters, initial_adapters, config)
  tied: list[str] = []
  if params is not None and tied_embeddings is not False:
    tied = _tied_embedding_paths(params, adapters, force=bool(tied_embeddings))
    if tied and getattr(config, "use_dora", False):
      raise ValueError(tied_dora_message(tied))
  tensors = peft_state_dict(adapters, params=params, module_name_map=module_name_map, dtype=dtype,
                            layouts=layouts)
  if len(tied) > 1:
    raise ValueError(f"Several adapted embeddings {tied} and one tied head: pass tied_embeddings.")
  if tied:  # PEFT's tied LoRA on the head: A = B_embedding^T, B = A_embedding^T
    embed = PEFT_PREFIX + (module_name_map or peft_module_name)(tied[0], ())
    head = PEFT_PREFIX + tied_head_name
    tensors[f"{head}.lora_A.weight"] = np.ascontiguousarray(tensors[f"{embed}.lora_embedding_B"].T)
    tensors[f"{head}.lora_B.weight"] = np.ascontiguousarray(tensors[f"{embed}.lora_embedding_A"].T)
  names = sorted({m.group("name") for k in tensors if k.startswith(PEFT_PREFIX)
                  for m in [pt.PEFT_KEY.match(k[len(PEFT_PREFIX):])] if m} - {tied_head_name})
  peft_config = peft_config_json(config, names, base_model_name_or_path, task_type)
  if tied:
    peft_config["ensure_weight_tying"] = True
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
      "dora_jax.method": config.variant.name,
      "dora_jax.version": _version(),
  }
  tmp = root / f"{PEFT_WEIGHTS_NAME}.tmp-{os.getpid()}"
  save_file(tensors, str(tmp), metadata=metadata)
  tmp.replace(root / PEFT_WEIGHTS_NAME)
  _write_json_atomic(root / PEFT_CONFIG_NAME, peft_config)


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


__all__ = [
    "ModuleNameMap",
    "export_peft",
    "import_peft",
    "peft_module_name",
    "peft_state_dict",
]


def _pattern_rank(peft_config: Mapping[str, Any], name: str, r: int) -> int:
  """A module's rank under PEFT's ``rank_pattern`` (``tuners/tuners_utils.py``: the first key
  matching ``(.*\.)?key$`` of the dotted module name), else ``r``."""
  for key, value in (peft_config.get("rank_pattern") or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return int(value)
  return r
