"""Smoke tests of the benchmarks: they run on the tiny preset and print the promised JSON fields.

No timing is asserted: a 2-core CI machine measures nothing meaningful in 2 steps.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, step_time

ROOT = Path(__file__).resolve().parents[1]

RECORD_FIELDS = {
    "method", "dora_path", "preset", "batch", "seq", "rank", "targets", "dtype", "median_ms",
    "step_time", "tokens_per_s", "flops_per_step", "flops_note", "mfu", "memory", "compile_s",
    "device_kind", "jax", "flax", "date",
}


def test_step_time_tiny_prints_json_lines(tmp_path):
  out = tmp_path / "r.jsonl"
  png = tmp_path / "r.png"
  argv = ["--preset", "tiny", "--methods", "frozen-forward,lora,dora", "--dora-paths", "custom_vjp",
          "--targets", "q_proj,v_proj", "--rank", "4", "--batch", "1", "--seq", "16", "--steps", "2",
          "--warmup", "1", "--no-isolate", "--out", str(out), "--plot", str(png)]
  # The CLI in a fresh process; XLA's backend optimizations off make the 3 compiles ~2x faster.
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-m", "bench.step_time", *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert [r["label"] for r in results] == ["frozen-forward", "lora", "dora[custom_vjp]"]
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert lines == results
  for r in results:
    assert "error" not in r, r.get("error")
    assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
    st = r["step_time"]
    assert st["n"] == 2 and st["p10_ms"] <= st["median_ms"] <= st["p90_ms"]
    assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and r["compile_s"] > 0
    assert r["memory"]["peak_bytes"] > 0 and r["memory"]["kind"]
    assert r["final_loss"] == pytest.approx(r["final_loss"])  # finite
  frozen, lora, dora = results
  assert frozen["flops"]["backward"] == 0 and lora["flops"]["backward"] > 0
  assert dora["flops"]["dora_norm"] > 0 and lora["flops"]["dora_norm"] == 0
  assert dora["dora_lora_ratio"] == pytest.approx(dora["median_ms"] / lora["median_ms"], rel=1e-3)
  assert lora["targets"] == ["q_proj", "v_proj"] and lora["rank"] == 4
  assert png.stat().st_size > 1000


def test_flop_count_matches_hand_count():
  c = common.PRESETS["tiny"]
  adapted = [common.AdaptedMatrix(256, 256, 4)]
  f = common.model_flops(c, 2, 8, train=True, rank=4, adapted=adapted, dora=True)
  dense = 2 * (c.num_params() - 0)  # tied embedding: the LM head is the embedding matmul
  attn = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 8
  adapter = 2 * 4 * (256 + 256) * 4
  assert f["forward"] == 16 * (dense + attn + adapter)
  assert f["backward"] == 16 * (dense + 2 * attn + 2 * adapter)
  assert f["dora_norm"] == 2 * 256 * 256 * 4 * 4
  assert common.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
  assert common.peak_flops("cpu", "float32") is None


def test_error_records_do_not_stop_the_run(monkeypatch):
  def boom(spec):
    raise RuntimeError("out of memory")

  monkeypatch.setattr(step_time, "run_one", boom)
  specs = step_time.expand_specs(step_time.Spec(), ["dora", "lora"], ["factored", "merged"])
  assert [s.label for s in specs] == ["lora", "dora[factored]", "dora[merged]"]
  buf = io.StringIO()
  recs = step_time.run_all(specs, isolate=False, stream=buf)
  assert all("out of memory" in r["error"] for r in recs) and len(buf.getvalue().splitlines()) == 3


def test_peft_compare_skips_cleanly_without_torch(monkeypatch, capsys):
  from bench import peft_compare

  monkeypatch.setattr(peft_compare, "missing_packages", lambda: ["peft"])
  recs = peft_compare.main(["--preset", "tiny"])
  assert recs[0]["skipped"].startswith("missing peft")
  assert json.loads(capsys.readouterr().out.strip())["skipped"] == recs[0]["skipped"]


def test_peft_compare_summary_ratios():
  from bench import peft_compare

  def round_(rnd, ours_dora_tps):
    ours = [{"method": "lora", "dora_path": None, "tokens_per_s": 200.0, "median_ms": 10.0, "round": rnd,
             "step_time": {"min_ms": 8.0}},
            {"method": "dora", "dora_path": "custom_vjp", "tokens_per_s": ours_dora_tps,
             "median_ms": 12.0, "round": rnd},
            {"method": "dora", "dora_path": "factored", "tokens_per_s": 100.0, "median_ms": 20.0,
             "round": rnd}]
    theirs = [{"method": "lora", "mode": "eager", "tokens_per_s": 100.0, "median_ms": 20.0, "round": rnd,
               "step_time": {"min_ms": 12.0 + rnd}},
              {"method": "dora", "mode": "eager", "tokens_per_s": 50.0, "median_ms": 30.0, "round": rnd},
              {"method": "dora", "mode": "compile", "error": "no compiler", "round": rnd}]
    return ours, theirs

  o1, t1 = round_(0, 150.0)
  o2, t2 = round_(1, 100.0)
  o3, t3 = round_(2, 200.0)
  (rec,) = peft_compare.summaries(o1 + o2 + o3, t1 + t2 + t3)
  vs = rec["ours_over_peft_tokens_per_s"]
  assert rec["rounds"] == 3
  assert vs["lora/peft-eager"] == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 3}
  assert vs["dora/peft-eager"] == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 3}  # the default path
  assert vs["dora[factored]/peft-eager"]["median"] == 2.0
  assert "dora/peft-compile" not in vs  # the failed configuration is left out, not counted as 0
  assert rec["dora_lora_step_ratio_ours"]["dora"]["median"] == 1.2
  assert rec["dora_lora_step_ratio_peft"]["eager"]["median"] == 1.5
  # best-step ratios (PEFT's fastest step over ours) where both sides recorded one
  assert rec["ours_over_peft_best_step"]["lora/peft-eager"] == {"median": 1.625, "min": 1.5, "max": 1.75, "n": 3}
  assert rec["ours_over_peft_best_step"]["dora/peft-eager"] is None


def test_step_time_lora_paths():
  specs = step_time.expand_specs(step_time.Spec(), ["lora", "dora"], ["custom_vjp"],
                                 lora_paths=["factored", "custom_vjp"])
  assert [s.label for s in specs] == ["lora[factored]", "lora", "dora[custom_vjp]"]


def test_vera_specs_and_per_round_ratios():
  specs = step_time.expand_specs(step_time.Spec(), ["dvora", "vera", "lora"], ["custom_vjp"], (256, 16))
  assert [s.label for s in specs] == ["lora", "vera[r=256]", "vera[r=16]", "dvora[r=256]", "dvora[r=16]"]
  assert [s.adapter_rank for s in specs] == [16, 256, 16, 256, 16]
  vera = {"method": "vera", "rank": 16, "median_ms": 10.0, "times_ms": [10.0, 20.0, 10.0]}
  dvora = {"method": "dvora", "rank": 16, "median_ms": 12.0, "times_ms": [11.0, 30.0, 14.0]}
  out = step_time.add_vera_ratios(dvora, {"vera[r=16]": vera, "vera[r=256]": {"times_ms": [1.0] * 3}})
  assert out["dvora_vera_ratio"] == 1.2
  assert out["dvora_vera_ratio_per_round"] == {"median": 1.4, "min": 1.1, "max": 1.5}


def test_quant_memory_bits_and_compiled_step_memory():
  """NF4 + double quantization against a hand count of its leaves; a compiled (abstract) step."""
  from bench import quant_memory

  rec = quant_memory.bytes_record("tiny", "nf4")
  c = common.PRESETS["tiny"]
  h, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
  sizes = [h * h, h * kv, h * kv, h * h, h * f, h * f, f * h]  # q, k, v, o, gate, up, down
  ceil = lambda a, b: -(-a // b)
  # codes n/2 bytes; 8-bit absmax codes (padded to 256 per block group); fp32 scale per 256; offset
  per_layer = sum(n // 2 + ceil(n // 64, 256) * (256 + 4) + 4 for n in sizes)
  assert rec["kernel_bytes"] == c.num_hidden_layers * per_layer
  assert rec["kernel_params"] == c.num_hidden_layers * sum(sizes)
  assert 4.12 < rec["kernel_bits_per_param"] < 4.14
  mem = quant_memory.memory_record("tiny", "nf4", "dora", 1, 16, targets=("q_proj",))
  assert mem["xla"]["temp_bytes"] > 0
  assert mem["xla"]["argument_bytes"] >= mem["base_bytes"] + mem["adapter_bytes"] + mem["opt_state_bytes"]
  text = quant_memory.tables([rec, mem])
  assert "| tiny | nf4 | 4.1" in text and "| tiny | 1×16 | none |" in text


def test_run_interleaved_keeps_the_configurations_that_work(monkeypatch):
  class Fake:
    def __init__(self, spec):
      if spec.method == "dora":
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
      self.spec, self.times = spec, []

    def step(self):
      if self.spec.method == "frozen-forward" and len(self.times) == 1:
        raise RuntimeError("device lost")
      self.times.append(0.1)

    def record(self, note):
      return {"label": self.spec.label, "steps": len(self.times), "note": note}

  monkeypatch.setattr(step_time, "Prepared", Fake)
  specs = step_time.expand_specs(step_time.Spec(steps=3), ["frozen-forward", "lora", "dora"], ["custom_vjp"])
  frozen, lora, dora = step_time.run_interleaved(specs)
  assert "device lost" in frozen["error"] and frozen["label"] == "frozen-forward"
  assert lora["steps"] == 3 and "interleaved" in lora["note"]
  assert "out of memory" in dora["error"] and dora["label"] == "dora[custom_vjp]"


def _step_record(label, method, median_ms, temp, **extra):
  xla = {"argument_bytes": 1000, "output_bytes": 100, "alias_bytes": 100, "temp_bytes": temp,
         "generated_code_bytes": 0}
  return {"label": label, "method": method, "dora_path": "custom_vjp" if method == "dora" else None,
          "median_ms": median_ms, "step_time": {"p10_ms": median_ms, "p90_ms": median_ms},
          "tokens_per_s": 8192 / median_ms * 1e3, "memory": {"peak_bytes": 1, "xla": xla},
          "device_kind": "NVIDIA H200", "preset": "tinyllama-1.1b", "batch": 4, "seq": 2048, **extra}


def test_gpu_report_summary_reads_targets_and_a_cut_peft_run(tmp_path):
  """The summary of a run whose peft_compare was killed before its summary line."""
  from bench import gpu_report

  stages = [{"stage": "step_time_tinyllama", "status": "ok", "rc": 0},
            {"stage": "peft_compare", "status": "timeout", "rc": 124}]
  (tmp_path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
  lora = _step_record("lora", "lora", 100.0, 1000, mfu=0.5)
  dora = _step_record("dora[custom_vjp]", "dora", 110.0, 1200, mfu=0.46,
                      dora_lora_ratio=1.1, dora_lora_ratio_per_round={"median": 1.04})
  (tmp_path / "step_time_tinyllama.jsonl").write_text(json.dumps(lora) + "\n" + json.dumps(dora) + "\n")
  ours = [{**_step_record("lora", "lora", 100.0, 1000), "side": "dora_jax", "round": 0,
           "memory": {"peak_bytes": 20e9, "kind": "device peak_bytes_in_use"}},
          {**_step_record("dora[custom_vjp]", "dora", 110.0, 1200), "side": "dora_jax", "round": 0,
           "memory": {"peak_bytes": 23e9, "kind": "device peak_bytes_in_use"}}]
  theirs = [{"side": "peft", "mode": "eager", "method": "dora", "label": "peft-eager[dora]", "round": 0,
             "median_ms": 330.0, "tokens_per_s": 8192 / 0.33, "step_time": {"min_ms": 300.0}},
            {"side": "peft", "mode": "compile", "method": "dora", "label": "peft-compile[dora]",
             "round": 0, "median_ms": 200.0, "tokens_per_s": 8192 / 0.2, "step_time": {"min_ms": 190.0}}]
  (tmp_path / "peft_compare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours + theirs))
  s = gpu_report.summarize(tmp_path)
  t = s["targets"]
  assert t["dora_lora_step_time"]["value"] == 1.04 and t["dora_lora_step_time"]["met"] is True
  # device peaks of the isolated runs (23 / 20 GB), not the XLA estimate (2200 / 2000)
  assert t["dora_lora_peak_memory"]["value"] == 1.15 and t["dora_lora_peak_memory"]["met"] is False
  assert t["dora_lora_peak_memory"]["xla_peak_estimate"] == 1.1 and t["dora_lora_peak_memory"]["xla_temp"] == 1.2
  assert t["dora_over_peft_compile_tokens_per_s"]["value"] == round(200 / 110, 4)
  assert t["dora_over_peft_compile_tokens_per_s"]["met"] is False
  assert t["lora_mfu"] == {**t["lora_mfu"], "value": 0.5, "met": True}
  assert s["peft_compare"]["partial"] is True
  assert s["peft_compare"]["ours_over_peft_tokens_per_s"]["dora/peft-eager"] == 3.0
  assert "lora/peft-compile" not in s["peft_compare"]["ours_over_peft_tokens_per_s"]  # never ran
  assert s["stages"]["peft_compare"]["status"] == "timeout"
