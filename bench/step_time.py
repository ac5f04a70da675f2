"""Training-step time of the project's Llama with LoRA / DoRA, through the public API.

Each configuration builds a random-weight :class:`dora_jax.models.llama.Llama`,
creates adapters with :func:`dora_jax.init_adapters`, runs the model through
:func:`dora_jax.wrap` and trains them with optax AdamW in one jitted step
(:func:`dora_jax.make_train_step`: forward, backward, optimizer update), as the trainer
runs it: the unrolled model (``--scan`` stacks the layers) and, for DoRA / DVoRA, the
base kernels' ``||W0||²_c`` computed once and passed in (``--no-cached-norms``
recomputes them every step). The ``frozen-forward`` method times the base model's jitted
forward and loss only.
One JSON line per configuration goes to stdout (and ``--out``)::

  python -m bench.step_time --preset tiny --methods frozen-forward,lora,dora \\
      --dora-paths factored,custom_vjp,merged --steps 20 --out results.jsonl --plot steps.png

``vera`` / ``dvora`` time PEFT's VeRA and DVoRA (:class:`dora_jax.VeraConfig`, ``r`` from
``--vera-rank``, 256 by default as PEFT's) in the same step; every method's optimizer is
``dora_jax.freeze_base(optax.adamw(...))`` (VeRA's shared projections get no update).

By default each configuration runs in its own subprocess (``--no-isolate`` to
stay in one), so peak memory (which only grows within a process) and compile
caches belong to that configuration alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench import common
from dora_jax.variants.dora import DEFAULT_PATH, PATHS as DORA_PATHS

METHODS = ("frozen-forward", "lora", "dora", "vera", "dvora")
DORA_METHODS = ("dora", "dvora")
"""Methods whose adapted layers run DoRA's magnitude (and ``dora_path``)."""
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Spec:
  """One benchmark configuration."""

  preset: str = "tiny"
  method: str = "dora"
  dora_path: str | None = DEFAULT_PATH
  batch: int = 4
  seq: int = 256
  rank: int = 16
  vera_rank: int = 256
  targets: tuple[str, ...] = common.DEFAULT_TARGETS
  dtype: str = "auto"
  steps: int = 20
  warmup: int = 3
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "auto"
  seed: int = 0
  dump_hlo: str | None = None
  cached_norms: bool = True  # DoRA / DVoRA: ||W0||²_c computed once, as the trainer does

  @property
  def label(self) -> str:
    if self.method == "dora":
      return f"dora[{self.dora_path}]"
    if self.method == "lora" and self.dora_path not in (None, DEFAULT_PATH):
      return f"lora[{self.dora_path}]"  # a reference path (autodiff backward)
    return f"{self.method}[r={self.vera_rank}]" if self.method in ("vera", "dvora") else self.method

  @property
  def adapter_rank(self) -> int:
    return self.vera_rank if self.method in ("vera", "dvora") else self.rank

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "Spec":
    d = json.loads(text)
    d.setdefault("vera_rank", 256)
    d["targets"] = tuple(d["targets"])
    return cls(**d)


# ---------------------------------------------------------------------------
# Building and timing one configuration (imports JAX lazily: see bench.common)


def resolve_dtype(name: str, platform: str) -> str:
  """``auto`` is bfloat16 on accelerators and float32 on CPU (XLA:CPU bf16 matmuls are slow)."""
  if name != "auto":
    return name
  return "float32" if platform == "cpu" else "bfloat16"


def resolve_attention(name: str, platform: str, dtype: str) -> str | None:
  """``auto`` is cuDNN flash attention on GPU in 16-bit dtypes, else XLA's (``None``)."""
  if name == "auto":
    return "cudnn" if platform == "gpu" and dtype in ("bfloat16", "float16") else None
  return None if name in ("xla", "none") else name


def cross_entropy(logits, targets):
  """Mean next-token cross-entropy over every position, float32."""
  import jax.numpy as jnp
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def adapted_matrices(adapters, params, layouts) -> list[common.AdaptedMatrix]:
  """``[I, O]`` and stack count of every adapted kernel (for the flop count), any method."""
  import math

  from dora_jax import tree as tree_lib

  out = []
  for path in tree_lib.flatten_adapters(adapters):
    module = tree_lib.get_path(params, path)
    shape = tuple(module[tree_lib.weight_key(module)].shape)
    layout = layouts.get(path) or tree_lib.default_layout(path, shape)
    i_dim, o_dim = layout.matrix_shape(shape)[-2:]
    out.append(common.AdaptedMatrix(i_dim, o_dim, math.prod(shape[: layout.stack])))
  return out


@functools.lru_cache(maxsize=2)
def build_base(preset: str, dtype: str, scan: bool, remat: str, attention_impl: str | None,
               batch: int, seq: int, seed: int):
  """The model, its random-weight params (jit init) and a random batch; cached per process."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from dora_jax.models.llama import Llama

  config = common.PRESETS[preset]
  dt = jnp.dtype(dtype)
  model = Llama(config, dtype=dt, param_dtype=dt, scan_layers=scan, remat=remat,
                attention_impl=attention_impl)
  k_init, k_ids, k_tg = jax.random.split(jax.random.key(seed), 3)
  params = nn.unbox(jax.jit(model.init)(k_init, jnp.zeros((1, 8), jnp.int32))["params"])
  ids = jax.random.randint(k_ids, (batch, seq), 0, config.vocab_size, jnp.int32)
  targets = jax.random.randint(k_tg, (batch, seq), 0, config.vocab_size, jnp.int32)
  return model, params, {"input_ids": ids, "targets": targets}


def build_step(spec: Spec, dtype: str, attention_impl: str | None):
  """The jitted function, its arguments and the flop count for ``spec``.

  Returns:
    ``(fn, args, next_args, flops, extra)``: ``fn(*args)`` is one step;
    ``next_args(args, outputs)`` gives the next call's arguments (donated
    adapters and optimizer state replaced by the new ones).
  """
  import jax
  import jax.numpy as jnp
  import optax

  import dora_jax

  config = common.PRESETS[spec.preset]
  model, params, batch = build_base(spec.preset, dtype, spec.scan, spec.remat, attention_impl,
                                    spec.batch, spec.seq, spec.seed)

  if spec.method == "frozen-forward":
    def forward_loss(params, batch):
      return cross_entropy(model.apply({"params": params}, batch["input_ids"]), batch["targets"])

    fn = jax.jit(forward_loss)
    flops = common.model_flops(config, spec.batch, spec.seq, train=False)
    return fn, (params, batch), lambda args, out: args, flops, {"trainable_params": 0}

  if spec.method in ("vera", "dvora"):
    cfg = dora_jax.VeraConfig(r=spec.vera_rank, target_modules=list(spec.targets),
                              use_dora=spec.method == "dvora")
  else:
    cfg = dora_jax.LoraConfig(r=spec.rank, lora_alpha=2.0 * spec.rank,
                              target_modules=list(spec.targets), use_dora=spec.method == "dora")
  layouts = dora_jax.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
  init = jax.jit(lambda key, p: dora_jax.init_adapters(key, p, cfg, layouts=layouts))
  adapters = init(jax.random.key(spec.seed + 1), params)
  apply = dora_jax.wrap(model.apply, cfg, dora_path=spec.dora_path or DEFAULT_PATH)
  norms = None
  if spec.method in DORA_METHODS and spec.cached_norms:
    from dora_jax import linen as dora_linen

    norms = jax.jit(dora_linen.base_norms)(params, adapters)
  frozen = {"params": params, "base_norms": norms}  # the trainer's frozen inputs

  def loss_fn(frozen, adapters, batch, rng):
    logits = apply(frozen["params"], adapters, batch["input_ids"], base_norms=frozen["base_norms"])
    return cross_entropy(logits, batch["targets"])

  tx = dora_jax.freeze_base(optax.adamw(1e-4, weight_decay=0.01, mask=dora_jax.weight_decay_mask))
  opt_state = tx.init(adapters)
  step = dora_jax.make_train_step(loss_fn, tx)
  adapted = adapted_matrices(adapters, params, layouts)
  flops = common.model_flops(config, spec.batch, spec.seq, train=True, rank=spec.adapter_rank,
                             adapted=adapted, dora=spec.method in DORA_METHODS)

  def next_args(args, out):
    new_adapters, new_state, _ = out
    return (args[0], new_adapters, new_state, args[3], args[4])

  trainable = jax.tree.leaves(dora_jax.trainable_mask(adapters))
  extra = {"trainable_params": int(sum(x.size for x, t in zip(jax.tree.leaves(adapters), trainable)
                                       if t)),
           "adapted_matrices": int(sum(m.count for m in adapted))}
  return step, (frozen, adapters, opt_state, batch, jax.random.key(spec.seed + 2)), next_args, flops, extra


def dump_hlo(compiled, spec: Spec) -> str:
  """Writes the optimized HLO of ``spec``'s step to ``spec.dump_hlo/<preset>-<label>.hlo.txt``.

  For checking what XLA keeps: e.g. no ``f32[L,I,O]`` copy of the stacked bf16 kernels.
  """
  os.makedirs(spec.dump_hlo, exist_ok=True)
  path = os.path.join(spec.dump_hlo, f"{spec.preset}-{spec.label.replace('[', '-').strip(']')}.hlo.txt")
  with open(path, "w") as f:
    f.write(compiled.as_text())
  return path


def memory_analysis(compiled) -> dict[str, int] | None:
  """XLA's static buffer sizes for the compiled step (bytes), when the backend reports them."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  return {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f, 0)) for f in fields}


def peak_memory(device) -> dict[str, Any]:
  """Peak device memory on accelerators; the process's max RSS on CPU (labelled)."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_bytes": int(stats["peak_bytes_in_use"]), "kind": "device peak_bytes_in_use"}
  return {"peak_bytes": common.process_max_rss_bytes(),
          "kind": "process max RSS (CPU: host memory of the whole process, runtime included)"}


def versions() -> dict[str, str]:
  import flax
  import jax
  import jaxlib
  import optax

  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__}


class Prepared:
  """A compiled, warmed-up configuration that times one step per :meth:`step` call."""

  def __init__(self, spec: Spec):
    import jax

    self.spec = spec
    self.device = jax.devices()[0]
    self.dtype = resolve_dtype(spec.dtype, self.device.platform)
    self.attention_impl = resolve_attention(spec.attention_impl, self.device.platform, self.dtype)
    fn, self.args, self.next_args, self.flops, self.extra = build_step(spec, self.dtype,
                                                                       self.attention_impl)
    t0 = time.perf_counter()
    self.compiled = fn.lower(*self.args).compile()
    self.compile_s = time.perf_counter() - t0
    if spec.dump_hlo:
      dump_hlo(self.compiled, spec)
    self.out = None
    self.times: list[float] = []
    for _ in range(max(spec.warmup, 1)):
      self._call()

  def _call(self) -> float:
    import jax

    t0 = time.perf_counter()
    self.out = jax.block_until_ready(self.compiled(*self.args))
    elapsed = time.perf_counter() - t0
    self.args = self.next_args(self.args, self.out)
    return elapsed

  def step(self) -> None:
    """Runs and times one step."""
    self.times.append(self._call())

  def record(self, memory_kind_note: str = "") -> dict[str, Any]:
    """The JSON record of the steps timed so far."""
    import jax

    spec, device, dtype = self.spec, self.device, self.dtype
    loss = self.out if spec.method == "frozen-forward" else self.out[2]["loss"]
    stats = common.time_stats(self.times)
    tokens = spec.batch * spec.seq
    median_s = stats["median_ms"] / 1e3
    peak = common.peak_flops(device.device_kind, dtype)
    memory = peak_memory(device)
    memory["kind"] += memory_kind_note
    record = {
        "bench": "step_time", "label": spec.label, "method": spec.method,
        "dora_path": (spec.dora_path or DEFAULT_PATH) if spec.method in DORA_METHODS else None,
        "cached_norms": spec.cached_norms if spec.method in DORA_METHODS else None,
        "path": None if spec.method == "frozen-forward" else spec.dora_path or DEFAULT_PATH,
        "preset": spec.preset, "batch": spec.batch, "seq": spec.seq, "tokens_per_step": tokens,
        "rank": None if spec.method == "frozen-forward" else spec.adapter_rank,
        "targets": None if spec.method == "frozen-forward" else list(spec.targets),
        "dtype": dtype, "scan": spec.scan, "remat": spec.remat, "attention_impl": self.attention_impl,
        "steps": len(self.times), "warmup": max(spec.warmup, 1),
        "median_ms": stats["median_ms"], "step_time": stats,
        "times_ms": [round(1e3 * t, 3) for t in self.times],
        "tokens_per_s": tokens / median_s,
        "flops_per_step": self.flops["total"], "flops": self.flops, "flops_note": common.FLOPS_NOTE,
        "peak_flops_per_s": peak, "mfu": None if peak is None else self.flops["total"] / median_s / peak,
        "memory": {**memory, "xla": memory_analysis(self.compiled)},
        "compile_s": self.compile_s, "final_loss": float(loss), **self.extra,
        "device_kind": device.device_kind, "platform": device.platform,
        "device_count": jax.device_count(), **versions(), "date": common.utc_now(),
        "host": common.host_info(),
    }
    return common.json_ready(record)


def run_one(spec: Spec) -> dict[str, Any]:
  """Compiles, warms up and times one configuration; returns its JSON record."""
  prepared = Prepared(spec)
  for _ in range(spec.steps):
    prepared.step()
  return prepared.record()


def run_interleaved(specs: Sequence[Spec]) -> list[dict[str, Any]]:
  """Compiles every configuration in this process, then times them round-robin, one step each.

  On a shared or throttling machine, load drifts over minutes; interleaving gives
  every configuration the same conditions, so their ratios stay meaningful. The
  process max RSS then covers all configurations together (labelled so). A configuration
  that fails to build, compile or run (e.g. out of memory) becomes an ``error`` record and
  the others go on.
  """
  slots: list[Any] = []
  for s in specs:
    try:
      slots.append(Prepared(s))
    except Exception as e:  # noqa: BLE001 - report and go on
      slots.append(error_record(s, f"{type(e).__name__}: {e}"[:2000]))
  for _ in range(max(s.steps for s in specs)):
    for i, p in enumerate(slots):
      if isinstance(p, Prepared) and len(p.times) < p.spec.steps:
        try:
          p.step()
        except Exception as e:  # noqa: BLE001
          slots[i] = error_record(p.spec, f"{type(e).__name__}: {e}"[:2000])
  return [p.record(" [interleaved: all configurations of this run]") if isinstance(p, Prepared) else p
          for p in slots]


# ---------------------------------------------------------------------------
# Many configurations, optionally one subprocess each


def run_isolated(spec: Spec, timeout_s: float | None = None,
                 extra_env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs ``spec`` in a fresh Python process; a failure becomes an ``error`` record."""
  cmd = [sys.executable, "-m", "bench.step_time", "--spec-json", spec.to_json()]
  try:
    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, env=env)
  except subprocess.TimeoutExpired:
    return error_record(spec, f"timed out after {timeout_s} s")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return error_record(spec, f"exit {proc.returncode}: " + " | ".join(tail))
  return json.loads(lines[-1])


def error_record(spec: Spec, message: str) -> dict[str, Any]:
  return {"bench": "step_time", "label": spec.label, "method": spec.method,
          "dora_path": spec.dora_path, "preset": spec.preset, "batch": spec.batch, "seq": spec.seq,
          "rank": spec.adapter_rank, "dtype": spec.dtype, "error": message, "date": common.utc_now()}


def expand_specs(base: Spec, methods: Sequence[str], dora_paths: Sequence[str],
                 vera_ranks: Sequence[int] = (),
                 lora_paths: Sequence[str] = (DEFAULT_PATH,)) -> list[Spec]:
  """One spec per method, one per DoRA path for ``dora``, one per path for ``lora`` (the
  ``custom_vjp`` default or the ``factored`` autodiff reference), one per rank in ``vera_ranks``
  (default ``base.vera_rank``) for ``vera`` / ``dvora``; LoRA runs before DoRA and VeRA before
  DVoRA (for the ratios)."""
  specs = []
  for method in sorted(methods, key=METHODS.index):
    if method == "dora":
      specs += [dataclasses.replace(base, method="dora", dora_path=p) for p in dora_paths]
    elif method in ("vera", "dvora"):
      specs += [dataclasses.replace(base, method=method, dora_path=None, vera_rank=r)
                for r in (vera_ranks or (base.vera_rank,))]
    elif method == "lora":
      specs += [dataclasses.replace(base, method="lora", dora_path=None if p == DEFAULT_PATH else p)
                for p in lora_paths]
    else:
      specs.append(dataclasses.replace(base, method=method, dora_path=None))
  return specs


def add_ratios(record: dict[str, Any], lora: dict[str, Any] | None,
               frozen: dict[str, Any] | None) -> dict[str, Any]:
  """DoRA/LoRA and method/frozen-forward step-time ratios from the same run."""
  med = record.get("median_ms")
  if record.get("method") == "dora":
    record["dora_lora_ratio"] = common.ratio(med, (lora or {}).get("median_ms"))
    # From the fastest steps: less sensitive to load spikes on a shared machine.
    record["dora_lora_ratio_min"] = common.ratio((record.get("step_time") or {}).get("min_ms"),
                                                 ((lora or {}).get("step_time") or {}).get("min_ms"))
  if record.get("method") in ("lora", "dora"):
    record["ratio_to_frozen_forward"] = common.ratio(med, (frozen or {}).get("median_ms"))
  return record


def per_round_ratio(record: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, float] | None:
  """Median, min and max over rounds of ``record``'s step / ``reference``'s step of the same
  round (interleaved runs: both hold ``times_ms`` of equal length), else None."""
  import statistics

  a, b = record.get("times_ms"), (reference or {}).get("times_ms")
  if not a or not b or len(a) != len(b):
    return None
  r = [x / y for x, y in zip(a, b)]
  return {"median": round(statistics.median(r), 4), "min": round(min(r), 4), "max": round(max(r), 4)}


def add_vera_ratios(record: dict[str, Any], refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """VeRA/LoRA, DVoRA/VeRA (same ``rank``) and DVoRA/DoRA step-time ratios: of the medians
  and, from interleaved runs, per round (``*_per_round``). ``refs`` maps ``lora``,
  ``dora`` (the first DoRA path) and ``vera[r=R]`` to their records."""
  method, med = record.get("method"), record.get("median_ms")
  pairs = []
  if method == "vera":
    pairs = [("vera_lora", refs.get("lora"))]
  elif method == "dvora":
    pairs = [("dvora_vera", refs.get(f"vera[r={record.get('rank')}]")), ("dvora_dora", refs.get("dora")),
             ("dvora_lora", refs.get("lora"))]
  elif method == "dora":
    pairs = [("dora_lora", refs.get("lora"))]
  for name, ref in pairs:
    if ref is None:
      continue
    record.setdefault(f"{name}_ratio", common.ratio(med, ref.get("median_ms")))
    per_round = per_round_ratio(record, ref)
    if per_round:
      record[f"{name}_ratio_per_round"] = per_round
  return record


def run_all(specs: Sequence[Spec], *, isolate: bool, interleave: bool = False,
            out_path: str | None = None, timeout_s: float | None = None,
            stream=sys.stdout) -> list[dict[str, Any]]:
  """Runs every spec, printing (and appending to ``out_path``) one JSON line each.

  ``interleave`` runs all of them in this process, round-robin (:func:`run_interleaved`).
  """
  results, lora, frozen, refs = [], None, None, {}
  done = iter(run_interleaved(specs)) if interleave else None
  for spec in specs:
    if done is not None:
      rec = next(done)
    elif isolate:
      rec = run_isolated(spec, timeout_s)
    else:
      try:
        rec = run_one(spec)
      except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
        rec = error_record(spec, f"{type(e).__name__}: {e}"[:2000])
    if rec.get("label") == "lora" and "error" not in rec:  # the default path
      lora = rec
    if rec.get("method") == "frozen-forward" and "error" not in rec:
      frozen = rec
    rec = add_vera_ratios(add_ratios(rec, lora, frozen), refs)
    if "error" not in rec:
      key = "dora" if rec.get("method") == "dora" else rec.get("label")
      refs.setdefault(key, rec)
    line = json.dumps(rec)
    print(line, file=stream, flush=True)
    if out_path:
      with open(out_path, "a") as f:
        f.write(line + "\n")
    results.append(rec)
  return results


def plot(results: Sequence[dict[str, Any]], path: str) -> None:
  """Bar chart of median step time per method (p10–p90 whiskers), DoRA/LoRA ratios annotated."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in results if "error" not in r]
  if not ok:
    raise ValueError("No successful results to plot.")
  labels = [r["label"] for r in ok]
  med = [r["median_ms"] for r in ok]
  lo = [r["median_ms"] - r["step_time"]["p10_ms"] for r in ok]
  hi = [r["step_time"]["p90_ms"] - r["median_ms"] for r in ok]
  colors = ["#999999" if r["method"] == "frozen-forward" else "#4c72b0" if r["method"] == "lora"
            else "#dd8452" for r in ok]
  fig, ax = plt.subplots(figsize=(1.6 * len(ok) + 2, 4.2))
  bars = ax.bar(labels, med, yerr=[lo, hi], capsize=4, color=colors)
  for bar, r in zip(bars, ok):
    text = f"{r['median_ms']:.1f} ms"
    if r.get("dora_lora_ratio"):
      text += f"\n{r['dora_lora_ratio']:.2f}x LoRA"
    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
  first = ok[0]
  ax.set_ylabel("step time, median (ms)")
  ax.set_title(f"{first['preset']}: batch {first['batch']} x seq {first['seq']}, {first['dtype']},"
               f" {first['device_kind']}", fontsize=9)
  ax.margins(y=0.2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.step_time", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tiny", choices=sorted(common.PRESETS))
  p.add_argument("--methods", default="frozen-forward,lora,dora",
                 help=f"comma list of {', '.join(METHODS)}")
  p.add_argument("--cached-norms", action=argparse.BooleanOptionalAction, default=True,
                 help="DoRA / DVoRA: pass ||W0||²_c computed once (dora_jax.linen.base_norms), as the"
                      " trainer does; --no-cached-norms recomputes it in every step")
  p.add_argument("--dora-paths", default=",".join(DORA_PATHS),
                 help=f"DoRA execution paths to time (dora_jax.wrap's dora_path): {', '.join(DORA_PATHS)}")
  p.add_argument("--lora-paths", default=DEFAULT_PATH,
                 help="LoRA backward to time: custom_vjp (default, hand-written), factored (autodiff)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rank", type=int, default=16, help="LoRA / DoRA rank")
  p.add_argument("--vera-ranks", default="256",
                 help="comma list of VeRA / DVoRA ranks (PEFT's default 256), one configuration each")
  p.add_argument("--targets", default=",".join(common.DEFAULT_TARGETS), help="comma list of module names")
  p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU/TPU, float32 on CPU), bfloat16, float32")
  p.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation (at least 1)")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                 help="nn.scan the layers (default off: the model's and the trainer's default;"
                      " on XLA:CPU the unrolled step is ~12 %% faster, scan compiles deep models faster)")
  p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  p.add_argument("--attention-impl", default="auto", help="auto (cudnn on GPU in bf16), xla, cudnn")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dump-hlo", default=None, help="write each step's optimized HLO to this folder")
  p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                 help="one subprocess per configuration (per-configuration peak memory)")
  p.add_argument("--interleave", action="store_true",
                 help="compile all configurations in one process and time them round-robin"
                      " (robust ratios on a loaded machine; peak RSS is then shared)")
  p.add_argument("--timeout", type=float, default=None, help="seconds per isolated configuration")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  p.add_argument("--plot", default=None, help="write a PNG bar chart here")
  p.add_argument("--spec-json", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  if args.spec_json:  # a child of run_isolated
    print(json.dumps(run_one(Spec.from_json(args.spec_json))), flush=True)
    return []
  methods = common.parse_list(args.methods)
  paths = common.parse_list(args.dora_paths)
  lora_paths = common.parse_list(args.lora_paths)
  bad = ([m for m in methods if m not in METHODS] + [p for p in paths if p not in DORA_PATHS]
         + [p for p in lora_paths if p not in ("custom_vjp", "factored")])
  if bad:
    raise SystemExit(f"Unknown methods / DoRA paths {bad}; methods: {METHODS}, paths: {DORA_PATHS}.")
  base = Spec(preset=args.preset, batch=args.batch, seq=args.seq, rank=args.rank,
              targets=common.parse_list(args.targets), dtype=args.dtype, steps=args.steps,
              warmup=args.warmup, scan=args.scan, remat=args.remat,
              attention_impl=args.attention_impl, seed=args.seed, dump_hlo=args.dump_hlo,
              cached_norms=args.cached_norms)
  vera_ranks = tuple(int(r) for r in common.parse_list(args.vera_ranks))
  results = run_all(expand_specs(base, methods, paths, vera_ranks, tuple(lora_paths)), isolate=args.isolate,
                    interleave=args.interleave, out_path=args.out, timeout_s=args.timeout)
  if args.plot:
    plot(results, args.plot)
  return results


if __name__ == "__main__":
  main()
