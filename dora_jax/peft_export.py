"""Writing HF PEFT's adapter folder: :func:`export_peft` and :func:`peft_state_dict`
(re-exported by :mod:`dora_jax.peft_format`, whose docstring describes the format)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

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
from dora_jax.peft_config import peft_config_json
from dora_jax.peft_names import (
    PEFT_CONFIG_NAME,
    PEFT_PREFIX,
    PEFT_WEIGHTS_NAME,
    ModuleNameMap,
    peft_module_name,
)
from dora_jax.tree import (
    KernelLayout,
    check_adapters,
    check_config_matches,
    flatten_adapters,
    iter_modules,
    shared_leaves,
    unbox,
    weight_key,
)


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
