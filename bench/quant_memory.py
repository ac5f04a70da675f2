"""QLoRA / QDoRA: bytes per base parameter, XLA memory of a training step, dequantization cost.

Three measurements of a bf16 base against the same base quantized by
:func:`dora_jax.quantize` (NF4 with double quantization, int8 per output channel; every
linear kernel but ``lm_head``, QLoRA's choice), LoRA and DoRA at r=16 on
q, k, v, o, gate, up, down (``dora_jax.wrap``'s default DoRA path, optax AdamW in
:func:`dora_jax.make_train_step`):

``bytes``
  Stored bits per parameter of the quantized kernels (codes, scales, offsets and padding:
  the pytree leaves' ``nbytes``) and the whole base's bytes (embeddings, norms and
  ``lm_head`` stay bf16). From ``jax.eval_shape``: nothing is materialized.
``memory``
  ``jit(step).lower(...).compile().memory_analysis()`` of the training step: argument,
  output, alias and temporary bytes; ``peak_estimate = argument + output − alias + temp``.
  The params, adapters and optimizer state are ``ShapeDtypeStruct``s from
  ``jax.eval_shape``: the 1.1B model is compiled, never built or run.
``time``
  Step time of the same step on a small preset (run for real), every base compiled in one
  process and timed round-robin, one step each per round (load drifts on a shared
  machine; ratios within a round stay meaningful); median and spread, and the median of
  per-round ratios to the full-precision base of the same compute dtype.

One JSON line per record (device, versions, date in each) to stdout and ``--out``;
``--table FILE`` prints README-ready markdown tables from a results file::

  python -m bench.quant_memory --out results.jsonl        # ~5-8 min on a loaded 2-core CPU
  python -m bench.quant_memory --parts memory --memory-shapes tinyllama-1.1b:4x2048 --remat full
  python -m bench.quant_memory --parts time --time-bases f32,nf4-f32,int8-f32,bf16,nf4,int8
  python -m bench.quant_memory --table results.jsonl

Every compile is abstract but the ``time`` part's, which runs ``--time-preset`` (``tiny``:
never point it at the 1.1B preset on a CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from typing import Any, Iterable, Sequence

from bench import common
from bench import step_time

BASES = ("bf16", "nf4", "int8")
"""``bf16``: the base kernels in bfloat16; ``nf4`` / ``int8``: those kernels quantized."""
METHODS = ("lora", "dora")
RANK = 16
MEMORY_SHAPES = (("smollm2-135m", 1, 256), ("tinyllama-1.1b", 1, 256))
"""Compiled by default (~4 min on a loaded 2-core CPU); add ``tinyllama-1.1b:4x2048`` (``--remat
full``) with ``--memory-shapes``."""


def _record(kind: str, **fields) -> dict[str, Any]:
  import jax

  device = jax.devices()[0]
  return common.json_ready({
      "bench": "quant_memory", "kind": kind, **fields, "device_kind": device.device_kind,
      "platform": device.platform, **step_time.versions(), "date": common.utc_now(),
      "host": common.host_info()})


def _leaf_bytes(tree: Any) -> int:
  import jax
  import numpy as np

  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


@functools.lru_cache(maxsize=None)
def abstract_model(preset: str, dtype: str, remat: str = "none"):
  """``(model, abstract params, layouts)``: params as ``ShapeDtypeStruct`` (never allocated)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import dora_jax
  from dora_jax.models.llama import Llama

  dt = jnp.dtype(dtype)
  model = Llama(common.PRESETS[preset], dtype=dt, param_dtype=dt, scan_layers=True, remat=remat)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
  return model, params, dora_jax.kernel_layouts(model, ids)


def quantize_fn(base: str, layouts):
  """``params -> params`` for a base name (identity for a float base)."""
  import dora_jax

  if base in ("bf16", "f32"):
    return lambda p: p
  return functools.partial(dora_jax.quantize, method=base, layouts=layouts)


def bytes_record(preset: str, base: str) -> dict[str, Any]:
  """Bits per parameter of the quantized kernels and the base's total bytes (abstract)."""
  import jax

  from dora_jax import quant

  _, params, layouts = abstract_model(preset, "bfloat16")
  qparams = jax.eval_shape(quantize_fn(base, layouts), params)
  kernels = [x for x in jax.tree.leaves(qparams, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
  if base == "bf16":  # the kernels the quantized bases replace, as they are in bf16
    q0 = jax.eval_shape(quantize_fn("nf4", layouts), params)
    n_kernel = sum(x.size for x in jax.tree.leaves(q0, is_leaf=quant.is_quantized)
                   if quant.is_quantized(x))
    kernel_bytes = 2 * n_kernel
  else:
    n_kernel = sum(x.size for x in kernels)
    kernel_bytes = sum(_leaf_bytes(x) for x in kernels)
  n_total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  total = _leaf_bytes(qparams)
  return _record("bytes", preset=preset, base=base, quantized_kernels=len(kernels),
                 kernel_params=n_kernel, kernel_bytes=kernel_bytes,
                 kernel_bits_per_param=8 * kernel_bytes / n_kernel, base_params=n_total,
                 base_bytes=total, base_bits_per_param=8 * total / n_total,
                 note="kernels: every linear kernel but lm_head (dora_jax.quantize's all-linear);"
                      " bytes from the pytree leaves (codes, scales, offsets, padding)")


def _train_step(model, method: str, targets: Sequence[str]):
  import optax

  import dora_jax

  cfg = dora_jax.LoraConfig(r=RANK, lora_alpha=2.0 * RANK, target_modules=list(targets),
                            use_dora=method == "dora")
  apply = dora_jax.wrap(model.apply, cfg)

  def loss_fn(params, adapters, batch, rng):
    del rng
    return step_time.cross_entropy(apply(params, adapters, batch["input_ids"]), batch["targets"])

  tx = optax.adamw(1e-4, weight_decay=0.01, mask=dora_jax.weight_decay_mask)
  return cfg, tx, dora_jax.make_train_step(loss_fn, tx)


def memory_record(preset: str, base: str, method: str, batch: int, seq: int,
                  targets: Sequence[str] = common.DEFAULT_TARGETS, remat: str = "none"
                  ) -> dict[str, Any]:
  """XLA memory analysis of the compiled training step, all inputs abstract."""
  import jax
  import jax.numpy as jnp

  import dora_jax

  model, params, layouts = abstract_model(preset, "bfloat16", remat)
  qparams = jax.eval_shape(quantize_fn(base, layouts), params)
  cfg, tx, step = _train_step(model, method, targets)
  adapters = jax.eval_shape(
      lambda p: dora_jax.init_adapters(jax.random.key(1), p, cfg, layouts=layouts), qparams)
  opt_state = jax.eval_shape(tx.init, adapters)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  t0 = time.perf_counter()
  compiled = step.lower(qparams, adapters, opt_state, {"input_ids": ids, "targets": ids},
                        rng).compile()
  compile_s = time.perf_counter() - t0
  mem = step_time.memory_analysis(compiled) or {}
  if mem:
    mem["peak_estimate_bytes"] = (mem["argument_bytes"] + mem["output_bytes"]
                                  - mem["alias_bytes"] + mem["temp_bytes"])
  return _record("memory", preset=preset, base=base, method=method, batch=batch, seq=seq,
                 rank=RANK, targets=list(targets), compute_dtype="bfloat16", remat=remat,
                 attention="XLA dot_product_attention (no flash kernel on CPU)",
                 base_bytes=_leaf_bytes(qparams), adapter_bytes=_leaf_bytes(adapters),
                 opt_state_bytes=_leaf_bytes(opt_state), xla=mem, compile_s=compile_s,
                 note="static buffer sizes of the compiled step (XLA memory_analysis);"
                      " peak_estimate = argument + output - alias + temp. On CPU, XLA converts"
                      " bf16 kernels to float32 for its dots, hoisting a float32 copy of the"
                      " stacked kernels out of the layer loop into temp (a quantized base is"
                      " dequantized per layer inside it)")


class _Timed:
  """One base × method on real arrays: compiled, warmed up, one timed step per call."""

  def __init__(self, preset: str, base: str, method: str, batch: int, seq: int, dtype: str,
               warmup: int):
    import jax

    import dora_jax

    self.base, self.method, self.dtype = base, method, dtype
    model, params, batch_data = step_time.build_base(preset, dtype, True, "none", None, batch, seq, 0)
    layouts = dora_jax.kernel_layouts(model, batch_data["input_ids"][:, :8])
    params = quantize_fn(base, layouts)(params)
    cfg, tx, step = _train_step(model, method, common.DEFAULT_TARGETS)
    adapters = jax.jit(lambda p: dora_jax.init_adapters(jax.random.key(1), p, cfg,
                                                        layouts=layouts))(params)
    self.args = [params, adapters, tx.init(adapters), batch_data, jax.random.key(2)]
    t0 = time.perf_counter()
    self.compiled = step.lower(*self.args).compile()
    self.compile_s = time.perf_counter() - t0
    self.times: list[float] = []
    for _ in range(max(warmup, 1)):
      self._call()

  def _call(self) -> float:
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(self.compiled(*self.args))
    elapsed = time.perf_counter() - t0
    self.args[1], self.args[2] = out[0], out[1]
    self.loss = float(out[2]["loss"])
    return elapsed

  def step(self) -> None:
    self.times.append(self._call())


def time_records(preset: str, bases: Sequence[str], batch: int, seq: int, rounds: int,
                 warmup: int) -> list[dict[str, Any]]:
  """Step times of every base × method, interleaved; ratios to the float base, per round."""
  runs = []
  for base in bases:
    dtype = "float32" if base.endswith("f32") else "bfloat16"
    quant_base = base.split("-")[0]
    for method in METHODS:
      runs.append(_Timed(preset, "f32" if quant_base == "f32" else quant_base, method, batch, seq,
                         dtype, warmup))
      runs[-1].label = base
  for _ in range(rounds):
    for r in runs:
      r.step()
  out = []
  for r in runs:
    ref = next(x for x in runs if x.method == r.method and x.dtype == r.dtype
               and x.base in ("f32", "bf16"))
    per_round = [a / b for a, b in zip(r.times, ref.times)]
    out.append(_record(
        "time", preset=preset, base=r.label, method=r.method, batch=batch, seq=seq, rank=RANK,
        compute_dtype=r.dtype, reference_base=ref.label, step_time=common.time_stats(r.times),
        median_ms=statistics.median(r.times) * 1e3,
        ratio_to_float_base={"median": statistics.median(per_round), "min": min(per_round),
                             "max": max(per_round), "p25": _q(per_round, 0.25),
                             "p75": _q(per_round, 0.75)},
        rounds=rounds, compile_s=r.compile_s, final_loss=r.loss,
        note="interleaved rounds (one step of each configuration per round); ratio = this"
             " step / the same round's step on the float base of the same compute dtype"))
  return out


def _q(values: Sequence[float], p: float) -> float:
  return common._quantile(sorted(values), p)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Tables


def _mb(n: float) -> str:
  return f"{n / 1e6:,.0f} MB" if n >= 1e7 else f"{n / 1e6:,.1f} MB"


def tables(records: Iterable[dict[str, Any]]) -> str:
  """README-ready markdown tables (bytes, step memory, step time) from the JSON records."""
  records = [r for r in records if r.get("bench") == "quant_memory" and "error" not in r]
  if not records:
    raise ValueError("No quant_memory records to tabulate.")
  first = records[0]
  lines = [f"{first['device_kind']} ({first['platform']}), jax {first['jax']}, flax {first['flax']},"
           f" {first['date'][:10]}; r={RANK} on q,k,v,o,gate,up,down, AdamW.", ""]
  by = [r for r in records if r["kind"] == "bytes"]
  if by:
    lines += ["| model | base | bits / param (quantized kernels) | base bytes (all params) |",
              "|---|---|---|---|"]
    for r in by:
      lines.append(f"| {r['preset']} | {r['base']} | {r['kernel_bits_per_param']:.3f} |"
                   f" {_mb(r['base_bytes'])} |")
    lines.append("")
  mem = [r for r in records if r["kind"] == "memory"]
  if mem:
    cols = [(b, m) for b in BASES for m in METHODS]
    lines += ["XLA memory analysis of the compiled training step (bf16 compute, XLA attention):"
              " peak estimate = argument + output − alias + temp, in GB (temp in brackets).", "",
              "| model | batch × seq | remat | " + " | ".join(f"{b} {m}" for b, m in cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
    rows: dict[tuple, dict] = {}
    for r in mem:
      rows.setdefault((r["preset"], r["batch"], r["seq"], r.get("remat", "none")), {})[
          (r["base"], r["method"])] = r["xla"]
    for (preset, b, sq, remat), cells in rows.items():
      text = [f"{cells[c]['peak_estimate_bytes'] / 1e9:.2f} [{cells[c]['temp_bytes'] / 1e9:.2f}]"
              if c in cells else "–" for c in cols]
      lines.append(f"| {preset} | {b}×{sq} | {remat} | " + " | ".join(text) + " |")
    lines.append("")
  tm = [r for r in records if r["kind"] == "time"]
  if tm:
    lines += [f"Step time ({tm[0]['preset']}, batch {tm[0]['batch']}×{tm[0]['seq']},"
              f" {tm[0]['rounds']} interleaved rounds; ratio = median of per-round ratios to the"
              " float base, [min, max]):", "",
              "| base | compute | method | median step | p10–p90 | × float base |",
              "|---|---|---|---|---|---|"]
    for r in tm:
      st, rt = r["step_time"], r["ratio_to_float_base"]
      lines.append(f"| {r['base']} | {r['compute_dtype']} | {r['method']} | {st['median_ms']:.0f} ms |"
                   f" {st['p10_ms']:.0f}–{st['p90_ms']:.0f} ms | {rt['median']:.2f}×"
                   f" [{rt['min']:.2f}, {rt['max']:.2f}] |")
  return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m bench.quant_memory", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="bytes,memory,time", help="comma list of bytes, memory, time")
  p.add_argument("--memory-shapes", default=",".join(f"{p}:{b}x{s}" for p, b, s in MEMORY_SHAPES),
                 help="comma list of preset:BATCHxSEQ compiled (never run) for the memory analysis")
  p.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                 help="rematerialize each layer in the backward of the memory-analysis steps")
  p.add_argument("--time-preset", default="tiny", choices=sorted(common.PRESETS))
  p.add_argument("--time-bases", default="bf16,nf4",
                 help="bases timed: f32 / bf16 full precision, nf4 / int8 quantized from bf16,"
                      " nf4-f32 / int8-f32 quantized from float32 (dequantized to float32)")
  p.add_argument("--time-batch", type=int, default=4)
  p.add_argument("--time-seq", type=int, default=128)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  p.add_argument("--table", default=None, metavar="FILE",
                 help="print markdown tables of the records in FILE and exit")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  if args.table:
    with open(args.table) as f:
      print(tables(json.loads(l) for l in f if l.strip()), end="")
    return []
  parts = common.parse_list(args.parts)
  results = []

  def emit(rec):
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(line + "\n")
    results.append(rec)

  shapes = []
  for item in common.parse_list(args.memory_shapes):
    preset, bs = item.split(":")
    b, s = bs.split("x")
    shapes.append((preset, int(b), int(s)))
  if "bytes" in parts:
    for preset in dict.fromkeys(p for p, _, _ in shapes):
      for base in BASES:
        emit(bytes_record(preset, base))
  if "memory" in parts:
    for preset, b, s in shapes:
      for base in BASES:
        for method in METHODS:
          try:
            emit(memory_record(preset, base, method, b, s, remat=args.remat))
          except Exception as e:  # noqa: BLE001 - report and go on
            emit(_record("memory", preset=preset, base=base, method=method, batch=b, seq=s,
                         remat=args.remat, error=f"{type(e).__name__}: {e}"[:2000]))
  if "time" in parts:
    for rec in time_records(args.time_preset, common.parse_list(args.time_bases), args.time_batch,
                            args.time_seq, args.rounds, args.warmup):
      emit(rec)
  print(tables(results), file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
