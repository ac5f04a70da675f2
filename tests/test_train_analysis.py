"""The trainer's decomposition tracking (train.analysis) and the paper-reproduction script,
on the tiny random Llama."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from _label_data import label_file

import dora_jax
from train import analysis
from train.config import make_config
from train.modeling import load_base_model
from train.run_dir import MetricsWriter

ROOT = Path(__file__).resolve().parents[1]
def _np_shift(w0, wt):
  w0, wt = np.asarray(w0, np.float64), np.asarray(wt, np.float64)
  m0, mt = np.linalg.norm(w0, axis=0), np.linalg.norm(wt, axis=0)
  return np.mean(np.abs(mt - m0)), np.mean(1 - (w0 * wt).sum(0) / (m0 * mt))


def test_track_writes_records_and_plot(tmp_path):
  base = load_base_model(make_config({"model": "tiny-random"})).params
  lcfg = dora_jax.LoraConfig(r=2, lora_alpha=4.0, target_modules=["q_proj", "v_proj", "o_proj"],
                             use_dora=True)
  adapters = dora_jax.init_adapters(jax.random.key(0), base, lcfg)
  rng = np.random.default_rng(1)
  writer = MetricsWriter(tmp_path, tensorboard=False, resume_step=0)
  writer.write({"step": 1, "loss": 1.0})
  for step in (2, 4):
    adapters = jax.tree.map(lambda x: x + 0.05 * step * rng.standard_normal(x.shape).astype(np.float32),
                            adapters)
    recs = analysis.track(step, base, adapters, lcfg, ("q_proj", "v_proj"))
    for r in recs:
      writer.write(r)
  writer.close()
  got = analysis.read_decomposition(tmp_path / "metrics.jsonl")
  n_layers = 2
  assert len(got) == 2 * 2 * n_layers
  assert {r["kind"] for r in got} == {"decomposition"} and {r["step"] for r in got} == {2, 4}
  assert {r["module"].rsplit("/", 1)[-1] for r in got} == {"q_proj", "v_proj"}
  last = [r for r in got if r["step"] == 4]
  merged = dora_jax.merge(base, adapters, lcfg)
  for r in last:
    w0 = dora_jax.tree.get_path(base, r["module"])["kernel"]
    wt = dora_jax.tree.get_path(merged, r["module"])["kernel"]
    np.testing.assert_allclose([r["delta_m"], r["delta_d"]], _np_shift(w0, wt), rtol=1e-3, atol=1e-7)
  slopes = analysis.plot_run_decomposition(tmp_path / "metrics.jsonl", tmp_path / "dec.png")
  assert (tmp_path / "dec.png").stat().st_size > 1000
  assert set(slopes["run"]) == {"q_proj", "v_proj"}
  # Full fine-tuning: the base kept as a host copy, the tuned params decomposed.
  kept = analysis.base_copy(base)
  tuned = jax.tree.map(lambda w: w * 1.5, base)
  recs = analysis.track(7, kept, tuned, None, ["q_proj"])
  assert len(recs) == n_layers and all(abs(r["delta_d"]) < 1e-6 and r["delta_m"] > 0 for r in recs)
  with pytest.raises(ValueError, match="no 'decomposition' records"):
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    analysis.plot_run_decomposition(tmp_path / "empty.jsonl", tmp_path / "x.png")


def _script():
  spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script


def _smoke(script, tmp_path, methods):
  out = tmp_path / "repro"
  result = script.main([
      "--quick", "--model", "tiny-random", "--task", str(label_file(tmp_path, 64)), "--steps", "2",
      "--track-every", "1", "--train-size", "32", "--eval-size", "16", "--lr-full", "1e-3",
      "--methods", ",".join(methods), "--output-dir", str(out),
      "--set", "seq_len=32", "--set", "eval_batch_size=16"])
  rows = {r["method"]: r for r in result["methods"]}
  assert list(rows) == list(methods)
  for r in rows.values():
    assert 0.0 <= r["after_mean"] <= 1.0 and r["seeds"] == [0] and r["trainable_params"] > 0
    for key in ("slopes", "slopes_within_step"):
      assert set(r[key]) == {"q_proj", "v_proj"} and np.isfinite(list(r[key].values())).all()
  decomp = [json.loads(l) for l in (out / "decomposition.jsonl").read_text().splitlines()]
  assert {d["step"] for d in decomp} == {1, 2}
  assert {d["method"] for d in decomp} == set(methods)
  assert {d["module"].rsplit("/", 1)[-1] for d in decomp} == {"q_proj", "v_proj"}
  assert (out / "decomposition.png").stat().st_size > 1000
  assert json.loads((out / "results.json").read_text())["methods"] == json.loads(json.dumps(result["methods"]))
  assert not list(out.glob("*/checkpoints"))  # removed after the analysis
  return rows


def test_reproduce_paper_script_smoke(tmp_path, capsys):
  """One method, 2 steps: the train -> tracked checkpoints -> analysis -> table/plot path."""
  _smoke(_script(), tmp_path, ["DoRA† r=4"])
  printed = capsys.readouterr().out
  assert "| DoRA† r=4 |" in printed and "slope ΔM/ΔD q_proj" in printed


@pytest.mark.slow
def test_reproduce_paper_script_all_methods(tmp_path):
  script = _script()
  rows = _smoke(script, tmp_path, list(script.METHODS))
  params = {k: r["trainable_params"] for k, r in rows.items()}
  assert params["Full FT"] > params["DoRA r=8"] > params["LoRA r=8"] > 0
  assert params["DoRA r=8"] > params["DoRA† r=4"]


def _run_cfg(tmp_path, out, **kw):
  base = dict(model="tiny-random", task=str(label_file(tmp_path, 48)), steps=3, batch_size=8, seq_len=32,
              eval_size=8, learning_rate=1e-2, warmup_steps=1, output_dir=str(tmp_path / out),
              progress=False, rank=4, alpha=8.0, eval_batch_size=8, track_decomposition=2)
  base.update(kw)
  return make_config(base)


@pytest.mark.parametrize("method", ["dora", "full"])
def test_trainer_tracks_decomposition(tmp_path, method):
  """--track-decomposition 2 on a 3-step run: records at steps 2 and 3 (the last), equal at the
  last step to a numpy decomposition of the exported kernels; decomposition.png drawn."""
  from dora_jax.models import load_pretrained
  from train.loop import run
  cfg = _run_cfg(tmp_path, method, method=method, export="merged")
  summary = run(cfg)
  out = tmp_path / method
  recs = analysis.read_decomposition(out / "metrics.jsonl")
  assert sorted({r["step"] for r in recs}) == [2, 3]
  assert {r["module"].rsplit("/", 1)[-1] for r in recs} == {"q_proj", "v_proj"}
  assert len([r for r in recs if r["step"] == 3]) == 2 * 2  # 2 modules x 2 layers
  assert (out / "decomposition.png").stat().st_size > 1000
  assert set(summary["decomposition_slopes"]) == {"q_proj", "v_proj"}
  base = load_base_model(cfg).params
  _, merged = load_pretrained(out / "merged")
  for r in (r for r in recs if r["step"] == 3):
    w0 = dora_jax.tree.get_path(base, r["module"])["kernel"]
    wt = dora_jax.tree.get_path(merged, r["module"])["kernel"]
    assert not np.allclose(w0, wt)
    np.testing.assert_allclose([r["delta_m"], r["delta_d"]], _np_shift(w0, wt), rtol=2e-3, atol=1e-6)
  # The training records are untouched by the tracking ones.
  steps = [r["step"] for r in json.loads("[" + ",".join((out / "metrics.jsonl").read_text().split("\n")[:-1]) + "]")
           if "loss" in r]
  assert steps == [1, 2, 3]


def test_track_modules_typo_fails_before_training(tmp_path):
  from train.loop import run
  with pytest.raises(ValueError, match="q_prj"):
    run(_run_cfg(tmp_path, "typo", track_modules=("q_prj",)))
  assert not (tmp_path / "typo" / "checkpoints").exists() or not list((tmp_path / "typo" / "checkpoints").iterdir())


def _tfrecords(path):
  """The records of a TFRecord file (length u64, crc u32, data, crc u32), parsed by hand."""
  import struct  # pylint: disable=g-import-not-at-top

  data, out, i = path.read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def test_tensorboard_events_are_written_after_the_readme_setup(tmp_path):
  """--tensorboard works with what .ci/setup installs (tensorboardX, in the [train] extra):
  the event file holds the scalars written, with their steps."""
  pytest.importorskip("tensorboardX")
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  writer = MetricsWriter(tmp_path, tensorboard=True, resume_step=0)
  writer.write({"step": 1, "loss": 2.5})
  writer.write({"step": 2, "loss": 1.5})
  writer.close()
  (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  scalars = []
  for raw in _tfrecords(events):
    ev = event_pb2.Event.FromString(raw)
    scalars += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
  assert scalars == [(1, "loss", 2.5), (2, "loss", 1.5)]
