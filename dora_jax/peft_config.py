"""PEFT's ``adapter_config.json`` for our configs, and our configs from it.

Field names and defaults are those of ``peft`` 0.21's ``LoraConfig`` (``peft_type
"LORA"``) and ``VeraConfig`` (``peft_type "VERA"``, ``tuners/vera/config.py``), as
``save_pretrained`` writes them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from dora_jax.config import LoraConfig, VeraConfig, config_from_dict, modifies_base

PEFT_TYPES = {"lora": "LORA", "vera": "VERA"}
"""Our method name -> PEFT's ``peft_type``."""


def peft_target_modules(config: Any, names: Sequence[str]) -> list[str]:
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


def peft_config_json(config: Any, names: Sequence[str], base_model_name_or_path: str | None,
                     task_type: str | None = None) -> dict[str, Any]:
  """``adapter_config.json`` of a :class:`LoraConfig` or (non-DoRA) :class:`VeraConfig`.

  VeRA's ``save_projection`` is always ``True``: the projections are written, since
  PEFT would re-draw them from ``projection_prng_key`` with torch's generator, whose
  numbers JAX's differ from.
  """
  common = {
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "inference_mode": True,
      "target_modules": peft_target_modules(config, names),
      "fan_in_fan_out": False,
      "bias": "none",
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
  }
  if isinstance(config, VeraConfig):
    return {
        **common,
        "peft_type": "VERA",
        "r": config.r,
        "projection_prng_key": config.projection_prng_key,
        "save_projection": True,
        "vera_dropout": config.vera_dropout,
        "d_initial": config.d_initial,
        "init_weights": True,
    }
  alpha = config.lora_alpha
  alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
  return {
      **common,
      "peft_type": "LORA",
      "exclude_modules": None,
      "r": config.r,
      "lora_alpha": alpha,
      "lora_dropout": config.lora_dropout,
      "lora_bias": False,
      "use_rslora": config.use_rslora,
      "use_dora": config.use_dora,
      "init_lora_weights": config.init_lora_weights,
      # PEFT matches these keys against dotted torch module names; ours against '/'-paths.
      "rank_pattern": {k.replace("/", "."): v for k, v in config.rank_pattern},
      "alpha_pattern": {k.replace("/", "."): v for k, v in config.alpha_pattern},
      "layer_replication": None,
      "megatron_config": None,
      "megatron_core": "megatron.core",
      "loftq_config": {},
      "auto_mapping": None,
  }


def config_from_peft(peft_config: Mapping[str, Any], metadata: Mapping[str, str],
                     paths: Sequence[str], dtype) -> Any:
  """Our config: the exporter's exact one (safetensors metadata from :func:`export_peft`),
  else built from ``adapter_config.json``."""
  if "dora_jax.config" in metadata:
    method = metadata.get("dora_jax.method", "lora")
    config = config_from_dict(json.loads(metadata["dora_jax.config"]), method)
    return dataclasses.replace(config, adapter_dtype=dtype)
  targets = peft_config.get("target_modules")
  if isinstance(targets, (list, tuple)) and not peft_config.get("exclude_modules"):
    target_modules: Any = tuple(targets)
  else:  # A regex over dotted torch names does not carry over: list what was loaded.
    target_modules = tuple(paths)
  if peft_config.get("peft_type") == "VERA":
    return VeraConfig(
        r=int(peft_config["r"]),
        target_modules=target_modules,
        projection_prng_key=int(peft_config.get("projection_prng_key", 0)),
        save_projection=True,
        vera_dropout=float(peft_config.get("vera_dropout", 0.0)),
        d_initial=float(peft_config.get("d_initial", 0.1)),
        adapter_dtype=dtype,
    )
  init = peft_config.get("init_lora_weights", True)
  return LoraConfig(
      r=int(peft_config["r"]),
      lora_alpha=float(peft_config.get("lora_alpha", peft_config["r"])),
      target_modules=target_modules,
      lora_dropout=float(peft_config.get("lora_dropout", 0.0)),
      use_dora=bool(peft_config.get("use_dora", False)),
      use_rslora=bool(peft_config.get("use_rslora", False)),
      init_lora_weights=init if init in (True, False, "gaussian") else True,
      rank_pattern={k.replace(".", "/"): int(v) for k, v in (peft_config.get("rank_pattern") or {}).items()},
      alpha_pattern={k.replace(".", "/"): float(v)
                     for k, v in (peft_config.get("alpha_pattern") or {}).items()},
      adapter_dtype=dtype,
  )


def check_peft_config(peft_config: Mapping[str, Any], directory) -> None:
  """Raises ``ValueError`` listing the PEFT features of ``adapter_config.json`` that
  dora_jax cannot import."""
  problems = []
  peft_type = peft_config.get("peft_type")
  if peft_type not in ("LORA", "VERA"):
    problems.append(f"peft_type={peft_type!r} (only 'LORA' and 'VERA')")
  if peft_config.get("lora_bias"):
    problems.append("lora_bias=True")
  if peft_config.get("bias", "none") != "none":
    problems.append(f"bias={peft_config['bias']!r} (only 'none')")
  if peft_type == "VERA":
    for field in ("rank_pattern", "alpha_pattern"):
      if peft_config.get(field):
        problems.append(f"{field}={peft_config[field]!r} (VeRA has one rank)")
  init = peft_config.get("init_lora_weights")
  if peft_type == "LORA" and modifies_base(init):
    problems.append(
        f"init_lora_weights={init!r} (the adapter was trained on the residual base W0 - s·A0 B0:"
        " re-save it from PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        " for a LoRA on the original base, or set init_lora_weights to true in adapter_config.json"
        " and run it on the residual params of dora_jax.init_adapters_and_base)")
  if peft_config.get("modules_to_save"):
    problems.append(f"modules_to_save={peft_config['modules_to_save']!r}")
  if peft_config.get("layer_replication"):
    problems.append("layer_replication")
  if peft_type == "VERA" and peft_config.get("save_projection") is False:
    problems.append(
        "save_projection=False (PEFT re-draws vera_A/vera_B from projection_prng_key with"
        " torch's generator, which JAX cannot reproduce; re-save it with save_projection=True)")
  if problems:
    raise ValueError(f"Cannot import the PEFT adapter in {directory}: " + "; ".join(problems) + ".")
