"""HF PEFT (torch) against dora_jax on the same Llama shape, batch, rank and targets, in one run.

The PEFT side builds ``transformers.LlamaForCausalLM(LlamaConfig(...))`` with
random weights, wraps it with ``peft.get_peft_model(LoraConfig(use_dora=...))``
and times a training step (forward, mean cross-entropy over every position,
backward, ``torch.optim.AdamW`` on the adapters), eager and under
``torch.compile``. Our side is :mod:`bench.step_time` (``dora_jax.wrap`` +
optax AdamW). Every configuration runs in its own subprocess, so neither
framework holds the GPU (or inflates the peak memory) of the other. Prints one
JSON line per configuration and round, then one ``summary`` line with the ratios (ours /
PEFT tokens/s as ``dora/peft-eager``, ``dora/peft-compile``, ``lora/peft-eager``,
``lora/peft-compile`` for our default DoRA path; DoRA/LoRA step time on each side), each the
median / min / max over ``--rounds`` interleaved rounds. On a shared CPU pin both sides'
threads (``--cpu-threads 1`` or 2) and read the spread before the median::

  python -m bench.peft_compare --preset tiny --batch 2 --seq 128 --steps 10
  python -m bench.peft_compare --preset tinyllama-1.1b --batch 4 --seq 2048 --dtype bfloat16  # GPU

Uses CUDA when torch sees it, else the CPU. Without torch / transformers / peft
it prints a ``skipped`` line and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from bench import common, step_time
from dora_jax.variants.dora import DEFAULT_PATH

TORCH_MODES = ("eager", "compile")
REQUIRED = ("torch", "transformers", "peft")


@dataclasses.dataclass(frozen=True)
class TorchSpec:
  """One PEFT configuration."""

  preset: str
  method: str  # "lora" or "dora"
  mode: str  # "eager" or "compile"
  batch: int
  seq: int
  rank: int
  targets: tuple[str, ...]
  dtype: str  # "auto", "bfloat16", "float32"
  steps: int
  warmup: int
  seed: int = 0
  cpu_threads: int = 0  # 0: torch's default

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "TorchSpec":
    d = json.loads(text)
    d["targets"] = tuple(d["targets"])
    return cls(**d)


def missing_packages() -> list[str]:
  """Which of torch / transformers / peft cannot be imported."""
  return [p for p in REQUIRED if importlib.util.find_spec(p) is None]


# ---------------------------------------------------------------------------
# The PEFT side (runs in a child process)


def build_peft_model(spec: TorchSpec, device, dtype):
  """``get_peft_model(LlamaForCausalLM(config), LoraConfig(...))`` with random base weights."""
  import peft
  import torch
  import transformers

  hf = transformers.LlamaConfig(**common.PRESETS[spec.preset].to_hf_dict())
  hf._attn_implementation = "sdpa"
  torch.manual_seed(spec.seed)
  with torch.device(device):
    model = transformers.LlamaForCausalLM._from_config(hf, dtype=dtype)
  lcfg = peft.LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=list(spec.targets),
                         lora_dropout=0.0, use_dora=spec.method == "dora")
  return peft.get_peft_model(model, lcfg)


def run_torch(spec: TorchSpec) -> dict[str, Any]:
  """Times one PEFT training step configuration; returns its JSON record."""
  import peft
  import torch
  import torch.nn.functional as F
  import transformers

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda and spec.cpu_threads:
    torch.set_num_threads(spec.cpu_threads)
  dtype_name = step_time.resolve_dtype(spec.dtype, "gpu" if cuda else "cpu")
  dtype = getattr(torch, dtype_name)
  model = build_peft_model(spec, device, dtype)
  model.train()
  config = common.PRESETS[spec.preset]
  gen = torch.Generator(device="cpu").manual_seed(spec.seed)
  ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq), generator=gen).to(device)
  targets = torch.randint(0, config.vocab_size, (spec.batch, spec.seq), generator=gen).to(device)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

  def forward_loss(ids_, targets_):
    logits = model(input_ids=ids_).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets_.reshape(-1))

  loss_fn = torch.compile(forward_loss) if spec.mode == "compile" else forward_loss

  def step():
    loss = loss_fn(ids, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  loss = step()
  sync()
  first_step_s = time.perf_counter() - t0
  for _ in range(max(spec.warmup, 1) - 1):
    step()
  sync()
  times = []
  for _ in range(spec.steps):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)

  stats = common.time_stats(times)
  tokens = spec.batch * spec.seq
  median_s = stats["median_ms"] / 1e3
  adapted = peft_adapted_matrices(model)
  flops = common.model_flops(config, spec.batch, spec.seq, train=True, rank=spec.rank, adapted=adapted,
                             dora=spec.method == "dora")
  kind = torch.cuda.get_device_name(0) if cuda else "cpu"
  peak = common.peak_flops(kind, dtype_name)
  if cuda:
    memory = {"peak_bytes": int(torch.cuda.max_memory_allocated()),
              "kind": "torch.cuda.max_memory_allocated"}
  else:
    memory = {"peak_bytes": common.process_max_rss_bytes(),
              "kind": "process max RSS (CPU: host memory of the whole process, runtime included)"}
  record = {
      "bench": "peft_compare", "side": "peft", "framework": "torch", "mode": spec.mode,
      "label": f"peft-{spec.mode}[{spec.method}]", "method": spec.method, "preset": spec.preset,
      "batch": spec.batch, "seq": spec.seq, "tokens_per_step": tokens, "rank": spec.rank,
      "targets": list(spec.targets), "dtype": dtype_name, "attention_impl": "sdpa",
      "steps": spec.steps, "warmup": max(spec.warmup, 1),
      "median_ms": stats["median_ms"], "step_time": stats, "tokens_per_s": tokens / median_s,
      "flops_per_step": flops["total"], "flops": flops, "flops_note": common.FLOPS_NOTE,
      "peak_flops_per_s": peak, "mfu": None if peak is None else flops["total"] / median_s / peak,
      "memory": memory, "first_step_s": first_step_s, "final_loss": float(loss),
      "trainable_params": int(sum(p.numel() for p in trainable)),
      "adapted_matrices": int(sum(m.count for m in adapted)),
      "device_kind": kind, "platform": "gpu" if cuda else "cpu", "torch_threads": torch.get_num_threads(),
      "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
      "date": common.utc_now(), "host": common.host_info(),
  }
  return common.json_ready(record)


def peft_adapted_matrices(model) -> list[common.AdaptedMatrix]:
  """``[I, O]`` of every ``lora_A`` / ``lora_B`` pair in a PEFT model (for the flop count)."""
  out = []
  for name, module in model.named_modules():
    if hasattr(module, "lora_A") and hasattr(module, "base_layer") and "default" in module.lora_A:
      w = module.base_layer.weight  # torch layout [out, in]
      out.append(common.AdaptedMatrix(int(w.shape[1]), int(w.shape[0]), 1))
  return out


# ---------------------------------------------------------------------------
# The run: children for both sides, then the ratios


def run_torch_isolated(spec: TorchSpec, timeout_s: float | None) -> dict[str, Any]:
  """Runs one PEFT configuration in a fresh process; a failure becomes an ``error`` record."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (str(step_time.REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
  cmd = [sys.executable, "-m", "bench.peft_compare", "--torch-spec-json", spec.to_json()]
  base = {"bench": "peft_compare", "side": "peft", "mode": spec.mode, "method": spec.method,
          "label": f"peft-{spec.mode}[{spec.method}]", "preset": spec.preset, "batch": spec.batch,
          "seq": spec.seq, "rank": spec.rank, "date": common.utc_now()}
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          cwd=step_time.REPO_ROOT, env=env)
  except subprocess.TimeoutExpired:
    return {**base, "error": f"timed out after {timeout_s} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {**base, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
  return json.loads(lines[-1])


def _stat(values: Sequence[float | None]) -> dict[str, float] | None:
  vals = sorted(v for v in values if v is not None)
  if not vals:
    return None
  mid = vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])
  return {"median": round(mid, 4), "min": round(vals[0], 4), "max": round(vals[-1], 4), "n": len(vals)}


def _our_name(rec: dict[str, Any]) -> str:
  """``lora``, ``dora`` (the default path) or ``dora[<path>]`` (another named path)."""
  if rec["method"] != "dora" or rec.get("dora_path") in (None, DEFAULT_PATH):
    return rec["method"]
  return f"dora[{rec['dora_path']}]"


def summaries(ours: Sequence[dict[str, Any]], peft_runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One summary line: ours/PEFT tokens/s per (our configuration, torch mode), DoRA/LoRA per side.

  Ratios are taken within each round (configurations of one round ran back to back), then
  summarized over rounds as median / min / max, so a load spike in one round shows as spread
  instead of moving the result. Keys: ``dora/peft-eager``, ``dora/peft-compile``,
  ``lora/peft-eager``, ``lora/peft-compile`` (our default DoRA path), ``dora[<path>]/...``
  for other paths; > 1 means we are faster.
  """
  ok = lambda rs: [r for r in rs if "error" not in r]
  ours, peft_runs = ok(ours), ok(peft_runs)
  if not ours and not peft_runs:
    return []
  rounds = sorted({r.get("round", 0) for r in [*ours, *peft_runs]})
  by_round = lambda rs, rnd: [r for r in rs if r.get("round", 0) == rnd]
  vs_peft: dict[str, list] = {}
  vs_peft_best: dict[str, list] = {}
  dora_lora_ours: dict[str, list] = {}
  dora_lora_peft: dict[str, list] = {}
  for rnd in rounds:
    mine, theirs = by_round(ours, rnd), by_round(peft_runs, rnd)
    lora_ms = next((m["median_ms"] for m in mine if m["method"] == "lora"), None)
    for m in mine:
      for t in theirs:
        if t["method"] == m["method"]:
          key = f"{_our_name(m)}/peft-{t['mode']}"
          vs_peft.setdefault(key, []).append(common.ratio(m["tokens_per_s"], t["tokens_per_s"]))
          vs_peft_best.setdefault(key, []).append(common.ratio(
              (t.get("step_time") or {}).get("min_ms"), (m.get("step_time") or {}).get("min_ms")))
      if m["method"] == "dora":
        dora_lora_ours.setdefault(_our_name(m), []).append(common.ratio(m["median_ms"], lora_ms))
    for t in theirs:
      if t["method"] == "dora":
        lora_t = next((p["median_ms"] for p in theirs if p["method"] == "lora" and p["mode"] == t["mode"]), None)
        dora_lora_peft.setdefault(t["mode"], []).append(common.ratio(t["median_ms"], lora_t))
  rec = {"bench": "peft_compare", "summary": "ratios", "rounds": len(rounds),
         "ours_over_peft_tokens_per_s": {k: _stat(v) for k, v in vs_peft.items()},
         # From each configuration's fastest step: on a loaded CPU, torch's OpenMP threads
         # lose whole time slices to other processes (medians 3-30x the best step), so the
         # best-step ratio shows what each side can do; both are kept.
         "ours_over_peft_best_step": {k: _stat(v) for k, v in vs_peft_best.items()},
         "dora_lora_step_ratio_ours": {k: _stat(v) for k, v in dora_lora_ours.items()},
         "dora_lora_step_ratio_peft": {k: _stat(v) for k, v in dora_lora_peft.items()}}
  ref = (ours or peft_runs)[0]
  rec.update({k: ref.get(k) for k in ("preset", "batch", "seq", "rank", "dtype", "device_kind")})
  rec["date"] = common.utc_now()
  return [rec]


def xla_thread_env(cpu_threads: int) -> dict[str, str]:
  """``XLA_FLAGS`` that keep XLA:CPU to one intra-op thread when ``cpu_threads == 1``."""
  if cpu_threads != 1:
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  return {"XLA_FLAGS": f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()}


def emit(rec: dict[str, Any], out_path: str | None) -> None:
  line = json.dumps(rec)
  print(line, flush=True)
  if out_path:
    with open(out_path, "a") as f:
      f.write(line + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.peft_compare", description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny", choices=sorted(common.PRESETS))
  p.add_argument("--methods", default="lora,dora")
  p.add_argument("--torch-modes", default="eager,compile", help="eager, compile (torch.compile)")
  p.add_argument("--dora-paths", default=DEFAULT_PATH,
                 help=f"our DoRA execution paths to run (default: the default path, {DEFAULT_PATH})")
  p.add_argument("--rounds", type=int, default=3,
                 help="repeat every configuration this many times, interleaved round by round;"
                      " the summary gives median / min / max of the per-round ratios")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--targets", default=",".join(common.DEFAULT_TARGETS))
  p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), bfloat16, float32")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                 help="ours: nn.scan the layers (default off, as the model and the trainer)")
  p.add_argument("--remat", default="none", choices=["none", "full", "dots"], help="ours")
  p.add_argument("--attention-impl", default="auto", help="ours: auto (cudnn on GPU in bf16), xla, cudnn")
  p.add_argument("--cpu-threads", type=int, default=0,
                 help="CPU only: threads for both sides (torch.set_num_threads; XLA's intra-op pool"
                      " when 1). 0: each framework's default. On a shared CPU, 1 avoids torch's"
                      " OpenMP threads spinning against other processes.")
  p.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  p.add_argument("--torch-spec-json", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  if args.torch_spec_json:  # a child of run_torch_isolated
    print(json.dumps(run_torch(TorchSpec.from_json(args.torch_spec_json))), flush=True)
    return []
  missing = missing_packages()
  if missing:
    rec = {"bench": "peft_compare", "skipped": f"missing {', '.join(missing)}: pip install torch transformers peft"}
    emit(rec, args.out)
    return [rec]
  methods = [m for m in common.parse_list(args.methods) if m in ("lora", "dora")]
  targets = common.parse_list(args.targets)
  base = step_time.Spec(preset=args.preset, batch=args.batch, seq=args.seq, rank=args.rank,
                        targets=targets, dtype=args.dtype, steps=args.steps, warmup=args.warmup,
                        scan=args.scan, remat=args.remat, attention_impl=args.attention_impl)
  specs = step_time.expand_specs(base, methods, common.parse_list(args.dora_paths))
  ours, theirs = [], []
  env = xla_thread_env(args.cpu_threads)
  for rnd in range(max(1, args.rounds)):
    for spec in specs:
      rec = step_time.run_isolated(spec, args.timeout, env)
      rec["cpu_threads"] = args.cpu_threads or None
      rec.update({"bench": "peft_compare", "side": "dora_jax", "round": rnd})
      emit(rec, args.out)
      ours.append(rec)
    for mode in common.parse_list(args.torch_modes):
      for method in methods:
        tspec = TorchSpec(args.preset, method, mode, args.batch, args.seq, args.rank, targets, args.dtype,
                          args.steps, args.warmup, cpu_threads=args.cpu_threads)
        rec = {**run_torch_isolated(tspec, args.timeout), "round": rnd}
        emit(rec, args.out)
        theirs.append(rec)
  summary = summaries(ours, theirs)
  for rec in summary:
    emit(rec, args.out)
  return ours + theirs + summary


if __name__ == "__main__":
  main()
