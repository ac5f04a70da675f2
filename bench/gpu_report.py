"""The environment record and the final summary of the prepared GPU run (``bench/gpu_run.sh``).

::

  python -m bench.gpu_report env OUT/env.json    # versions, devices, nvidia-smi, where dora_jax comes from
  python -m bench.gpu_report summary OUT         # one JSON line: stages, issue 15's GPU targets, ratios

``summary`` reads what the stages left in ``OUT`` (``stages.jsonl`` and ``<stage>.jsonl``), so a
stage that failed or timed out costs only its own numbers; where ``bench.peft_compare`` was stopped
before its summary line, the ratios are recomputed from the records it did write (``partial``).
Every probe of ``env`` is guarded: one that fails becomes an entry of ``errors`` (``env`` imports
neither JAX nor ``bench.common`` at module level, so a broken JAX still leaves a record).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import datetime
import platform
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "flax",
            "optax", "orbax-checkpoint", "numpy", "safetensors", "torch", "transformers", "peft",
            "triton", "nvidia-cudnn-cu12")
TARGETS = {  # issue 15, item 6: (name, comparison, bound)
    "dora_lora_step_time": ("<=", 1.05),
    "dora_lora_peak_memory": ("<=", 1.10),
    "dora_over_peft_compile_tokens_per_s": (">=", 2.0),
    "lora_mfu": (">=", 0.45),
}
NVIDIA_SMI_QUERY = "name,memory.total,driver_version,clocks.max.sm,power.limit,temperature.gpu,utilization.gpu"


def _guard(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - an environment probe must not stop the record
    errors[name] = f"{type(e).__name__}: {e}"[:500]
    return None


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _jax_probe() -> dict[str, Any]:
  import jax

  from bench import common

  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  return {"backend": jax.default_backend(), "device_count": len(devices),
          "devices": [{"id": d.id, "platform": d.platform, "device_kind": d.device_kind, "str": str(d)}
                      for d in devices],
          "bytes_limit": stats.get("bytes_limit"),
          "peak_flops_bf16": common.peak_flops(devices[0].device_kind, "bfloat16")}


def _dora_jax_probe() -> dict[str, Any]:
  import dora_jax

  path = Path(dora_jax.__file__).resolve()
  return {"file": str(path), "from_source_tree": REPO_ROOT in path.parents}


def _torch_probe() -> dict[str, Any]:
  import torch

  cuda = torch.cuda.is_available()
  return {"cuda_available": cuda, "cuda": torch.version.cuda,
          "cudnn": torch.backends.cudnn.version() if cuda else None,
          "device_name": torch.cuda.get_device_name(0) if cuda else None,
          "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None}


def _nvidia_smi() -> dict[str, Any]:
  proc = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv"],
                        capture_output=True, text=True, timeout=30, check=True)
  return {"query": proc.stdout.strip().splitlines()}


def env_record() -> dict[str, Any]:
  """Versions, devices and settings of this machine; probes that fail land in ``errors``."""
  errors: dict[str, str] = {}
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  rec: dict[str, Any] = {"bench": "gpu_run", "kind": "env", "date": now, "cpu_count": os.cpu_count(),
                         "python": platform.python_version(), "executable": sys.executable,
                         "cwd": os.getcwd(),
                         "packages": {p: _version(p) for p in PACKAGES}}
  rec["env_vars"] = {k: v for k, v in os.environ.items()
                     if k.startswith(("JAX_", "XLA_", "CUDA_VISIBLE", "TORCH", "SMOKE"))}
  rec["git"] = _guard(errors, "git", lambda: subprocess.run(
      ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=REPO_ROOT,
      check=True).stdout.strip())
  rec["nvidia_smi"] = _guard(errors, "nvidia_smi", _nvidia_smi)
  rec["jax"] = _guard(errors, "jax", _jax_probe)
  rec["dora_jax"] = _guard(errors, "dora_jax", _dora_jax_probe)
  rec["torch"] = _guard(errors, "torch", _torch_probe)
  for name in ("transformers", "peft"):
    _guard(errors, name, lambda name=name: __import__(name))
  rec["errors"] = errors
  return rec


# ---------------------------------------------------------------------------
# The summary


def read_jsonl(path: Path) -> list[dict[str, Any]]:
  """The JSON lines of ``path`` (none when it is missing; unparsable lines are skipped)."""
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    if line.startswith("{"):
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def _xla_peak(rec: dict[str, Any] | None) -> int | None:
  """argument + output − alias + temp bytes of a record's compiled step (XLA memory analysis)."""
  m = ((rec or {}).get("memory") or {}).get("xla")
  if not m:
    return None
  return m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]


def _xla_temp(rec: dict[str, Any] | None) -> int | None:
  return (((rec or {}).get("memory") or {}).get("xla") or {}).get("temp_bytes")


def _find(records: Sequence[dict[str, Any]], **fields) -> dict[str, Any] | None:
  return next((r for r in records if "error" not in r and all(r.get(k) == v for k, v in fields.items())),
              None)


def _check(name: str, value: float | None) -> dict[str, Any]:
  op, bound = TARGETS[name]
  met = None if value is None else (value <= bound if op == "<=" else value >= bound)
  return {"value": value, "target": f"{op} {bound}", "met": met}


def _step_numbers(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Median step, tokens/s, MFU, compile time, memory of each configuration of a step_time run."""
  out = {}
  for r in records:
    if "error" in r:
      out[r.get("label", "?")] = {"error": r["error"][:300]}
      continue
    out[r["label"]] = {"median_ms": r.get("median_ms"), "p10_ms": r["step_time"]["p10_ms"],
                       "p90_ms": r["step_time"]["p90_ms"], "tokens_per_s": r.get("tokens_per_s"),
                       "mfu": r.get("mfu"), "compile_s": r.get("compile_s"),
                       "xla_peak_estimate_bytes": _xla_peak(r),
                       "xla_temp_bytes": _xla_temp(r),
                       "device_peak_bytes": (r.get("memory") or {}).get("peak_bytes"),
                       "dora_lora_ratio": r.get("dora_lora_ratio"),
                       "dora_lora_ratio_per_round": r.get("dora_lora_ratio_per_round")}
  return out


def _peft_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """peft_compare's summary line, or one recomputed from its records (``partial``) when it was cut."""
  line = next((r for r in records if r.get("summary") == "ratios"), None)
  if line is not None:
    return {**line, "partial": False}
  from bench import peft_compare

  ours = [r for r in records if r.get("side") == "dora_jax"]
  theirs = [r for r in records if r.get("side") == "peft"]
  (rec,) = peft_compare.summaries(ours, theirs) or ({},)
  return {**rec, "partial": True} if rec else None


def summarize(out_dir: Path) -> dict[str, Any]:
  """The summary of a ``gpu_run.sh`` output folder (see the module docstring)."""
  from bench import common
  from dora_jax.variants.dora import DEFAULT_PATH

  stages = read_jsonl(out_dir / "stages.jsonl")
  data = {s["stage"]: read_jsonl(out_dir / f"{s['stage']}.jsonl") for s in stages}
  main = data.get("step_time_tinyllama") or []
  if _find(main, label="lora") is None and data.get("step_time_tinyllama_xla_attention"):
    main = data["step_time_tinyllama_xla_attention"]  # the fallback without cuDNN attention
  lora = _find(main, label="lora")
  dora = _find(main, method="dora", dora_path=DEFAULT_PATH)
  peft_records = data.get("peft_compare") or []
  peft = _peft_summary(peft_records)
  iso = {m: _find(peft_records, side="dora_jax", method=m) for m in ("lora", "dora")}
  iso = {m: r for m, r in iso.items() if r and (r.get("dora_path") in (None, DEFAULT_PATH))}
  device_peak = {m: (r.get("memory") or {}).get("peak_bytes") for m, r in iso.items()
                 if str((r.get("memory") or {}).get("kind", "")).startswith("device")}

  per_round = (dora or {}).get("dora_lora_ratio_per_round") or {}
  step_ratio = per_round.get("median", (dora or {}).get("dora_lora_ratio"))
  xla_ratio = common.ratio(_xla_peak(dora), _xla_peak(lora))
  dev_ratio = common.ratio(device_peak.get("dora"), device_peak.get("lora"))
  vs_compile = (((peft or {}).get("ours_over_peft_tokens_per_s") or {}).get("dora/peft-compile") or {})
  targets = {
      "dora_lora_step_time": {**_check("dora_lora_step_time", step_ratio),
                              "how": "median over interleaved rounds of DoRA step / LoRA step"},
      "dora_lora_peak_memory": {**_check("dora_lora_peak_memory", dev_ratio if dev_ratio else xla_ratio),
                                "how": "device peak_bytes_in_use of isolated runs (peft_compare's"
                                       " dora_jax side)" if dev_ratio else
                                       "XLA memory analysis: argument + output - alias + temp",
                                "device_peak_isolated": dev_ratio, "xla_peak_estimate": xla_ratio,
                                "xla_temp": common.ratio(_xla_temp(dora), _xla_temp(lora))},
      "dora_over_peft_compile_tokens_per_s": {
          **_check("dora_over_peft_compile_tokens_per_s", vs_compile.get("median")),
          "how": "our default DoRA tokens/s / PEFT + torch.compile DoRA tokens/s"},
      "lora_mfu": {**_check("lora_mfu", (lora or {}).get("mfu")),
                   "how": "counted model flops / median step / dense bf16 peak (bench/common.py FLOPS_NOTE)"},
  }
  first = lora or dora or next((r for r in main if "error" not in r), {})
  summary = {
      "bench": "gpu_run", "summary": "issue 15 item 6", "date": common.utc_now(),
      "device_kind": first.get("device_kind"), "preset": first.get("preset"),
      "batch": first.get("batch"), "seq": first.get("seq"), "dtype": first.get("dtype"),
      "attention_impl": first.get("attention_impl"), "jax": first.get("jax"),
      "stages": {s["stage"]: {k: s.get(k) for k in ("status", "rc", "wall_s", "timeout_s", "reason")
                              if s.get(k) is not None} for s in stages},
      "targets": targets,
      "step_time_tinyllama": _step_numbers(main),
      "device_peak_isolated_bytes": device_peak or None,
      "peft_compare": None if peft is None else {
          "partial": peft.get("partial"),
          "ours_over_peft_tokens_per_s": {k: (v or {}).get("median") for k, v in
                                          (peft.get("ours_over_peft_tokens_per_s") or {}).items()},
          "dora_lora_step_ratio_peft": peft.get("dora_lora_step_ratio_peft"),
          "errors": [f"{r.get('label')}: {r['error'][:200]}" for r in peft_records if "error" in r]},
      "step_time_smollm2": _step_numbers(data.get("step_time_smollm2") or []) or None,
      "quant_time_smollm2": {f"{r['base']}/{r['method']}": {
          "median_ms": r.get("median_ms"), "ratio_to_float_base": (r.get("ratio_to_float_base") or {}).get(
              "median")} for r in data.get("quant_time_smollm2") or [] if r.get("kind") == "time"} or None,
      "quant_memory_tinyllama": {f"{r['base']}/{r['method']}": (r.get("xla") or {}).get("peak_estimate_bytes")
                                 for r in data.get("quant_memory_tinyllama") or []
                                 if r.get("kind") == "memory" and "error" not in r} or None,
  }
  return common.json_ready(summary)


def human_lines(summary: dict[str, Any]) -> list[str]:
  """One readable line per target and stage (the JSON line follows them)."""
  lines = [f"{summary.get('device_kind')} {summary.get('preset')} {summary.get('batch')}x{summary.get('seq')}"
           f" {summary.get('dtype')} attention={summary.get('attention_impl')}"]
  for name, t in summary["targets"].items():
    verdict = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
    lines.append(f"  {name}: {t['value']} (target {t['target']}) {verdict}")
  for name, s in summary["stages"].items():
    lines.append(f"  stage {name}: {s.get('status')} (rc {s.get('rc')}, {s.get('wall_s')} s)")
  return lines


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) != 2 or argv[0] not in ("env", "summary"):
    raise SystemExit("usage: python -m bench.gpu_report env OUT/env.json | summary OUT")
  if argv[0] == "env":
    rec = env_record()
    Path(argv[1]).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({k: rec[k] for k in ("jax", "dora_jax", "torch", "errors")}))
    return
  out_dir = Path(argv[1])
  summary = summarize(out_dir)
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  for line in human_lines(summary):
    print(line)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
