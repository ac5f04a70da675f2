"""Nothing lost, ever (issue 12): runs survive kill -9, SIGTERM, SIGINT, damaged files and a
second writer with their history intact; the library refuses bad input with clear errors.

The trainer runs the tiny random Llama on a small text task (perplexity: a continuous metric,
so an evaluation made with the wrong adapters shows). Paths are relative to the current
directory, as in the README's main job.
"""

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _adapter_trees import make, unscanned_params
from safetensors.numpy import load_file, save_file

import dora_jax
from train.checkpoint import CorruptCheckpointError, TrainCheckpointer
from train.config import load_config, make_config
from train import data as data_lib
from train.loop import StopRequested, _StopSignals, run
from train.run_dir import (
    MetricsWriter, RunLock, RunLockedError, read_records, recover_dir, replace_dir, write_atomic,
)

REPO = Path(__file__).resolve().parents[1]
TIMING = ("step_seconds", "tokens_per_s", "seconds")  # the only fields two runs may differ in


def _corpus(directory: Path, variant: str = "") -> str:
  (directory / "corpus.txt").write_text(
      "\n\n".join(f"the film is good and the plot is {w} {i}{variant}"
                  for i, w in enumerate(["great", "dull", "fine", "moving"] * 12)))
  return "corpus.txt"


def _settings(**kw) -> dict:
  base = dict(model="tiny-random", task="corpus.txt", packing=True, steps=6, batch_size=4,
              seq_len=32, eval_size=8, eval_batch_size=8, learning_rate=1e-2, warmup_steps=2,
              rank=4, alpha=8.0, save_every=2, keep_checkpoints=2, progress=False)
  base.update(kw)
  return base


def _run(**kw):
  """run() with its printed output: ``(summary, text)``."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    summary = run(make_config(_settings(**kw)))
  return summary, buf.getvalue()


def _same(a, b):
  """Records / summaries without their timings."""
  strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}
  if isinstance(a, list):
    return [strip(r) for r in a] == [strip(r) for r in b]
  return strip(a) == strip(b)


@pytest.fixture
def compile_cache(session_compilation_cache) -> Path:
  """The test session's persistent compilation cache (``tests/conftest.py``), which the
  subprocesses here share: every run compiles the same programs, so each is compiled once."""
  return Path(session_compilation_cache)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
  """A run stopped after step 4 of 6 (checkpoints 2 and 4), made from a relative directory
  with --resume and no checkpoint yet. Tests copy it (``corpus.txt`` + ``run/``)."""
  root = tmp_path_factory.mktemp("partial")
  _corpus(root)
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(root)
    summary, text = _run(output_dir="run", stop_after=4, resume=True)
  return root, summary, text


def _copy_partial(partial, tmp_path, monkeypatch) -> Path:
  root = partial[0]
  shutil.copy(root / "corpus.txt", tmp_path / "corpus.txt")
  shutil.copytree(root / "run", tmp_path / "run")
  monkeypatch.chdir(tmp_path)
  return tmp_path / "run"


# ---------------------------------------------------------------------------
# One test per fault of issue 12


def test_1_resumed_run_dying_before_its_first_step_keeps_metrics(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  recs = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo')  # torn by a kill
  assert read_records(path) == recs
  # A resume from step 3 that dies before its first step: the kept history is on disk.
  MetricsWriter(tmp_path, False, resume_step=3)  # never written to, never closed
  assert read_records(path) == recs[:3]
  (tmp_path / ".metrics.json.tmp-1").write_text("{")  # left by a writer killed before its rename
  write_atomic(tmp_path / "metrics.json", "{}")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "metrics.jsonl"]
  # A kill during the trim itself (before the rename) leaves the old content whole.
  monkeypatch.setattr("train.run_dir.os.replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
  with pytest.raises(OSError, match="killed"):
    MetricsWriter(tmp_path, False, resume_step=1)
  assert read_records(path) == recs[:3]


def test_2_overwrite_starts_afresh(partial, tmp_path, monkeypatch):
  out = _copy_partial(partial, tmp_path, monkeypatch)
  with pytest.raises(ValueError, match="pass one of them"):
    make_config(_settings(resume=True, overwrite=True))
  # A flag overrides a config file that contradicts it (the main job's TOML sets overwrite).
  toml = REPO / "train" / "configs" / "sentiment.toml"
  cfg = load_config(["--config", str(toml), "--resume"])
  assert cfg.resume and not cfg.overwrite
  summary, text = _run(output_dir="run", overwrite=True)
  assert "--overwrite: deleted the previous run's checkpoints [2, 4] and metrics.json, metrics.jsonl" in text
  assert summary["resumed_from"] is None and summary["after"]["perplexity"] > 1
  assert [r["step"] for r in read_records(out / "metrics.jsonl")] == list(range(1, 7))
  assert TrainCheckpointer(out / "checkpoints", None).all_steps() == [4, 6]


def test_3_summary_of_a_killed_and_resumed_run_is_the_whole_runs(partial, tmp_path, monkeypatch):
  _, stopped, _ = partial
  out = _copy_partial(partial, tmp_path, monkeypatch)
  (out / "metrics.json").unlink()  # a SIGKILL leaves none
  # Fault 5 too: an export killed midway left its leftovers next to an older export.
  (out / "peft_adapter").mkdir()
  (out / "peft_adapter" / "adapter_config.json").write_text("{}")
  (out / "peft_adapter" / "adapter_model.safetensors.tmp").write_bytes(b"partial")
  (out / ".peft_adapter.tmp-1").mkdir()
  summary, text = _run(output_dir="run", resume=True, export="peft")
  assert "resumed from step 4" in text
  # "before" is the first process's evaluation (of the initial adapters), not one of the
  # restored adapters; the first loss is step 1's.
  assert _same(summary["before"], stopped["before"])
  assert summary["first_loss"] == stopped["first_loss"] == read_records(out / "metrics.jsonl")[0]["loss"]
  assert summary["after"]["perplexity"] != summary["before"]["perplexity"]
  assert sorted(p.name for p in out.iterdir() if "peft" in p.name) == ["peft_adapter"]
  assert sorted(p.name for p in (out / "peft_adapter").iterdir()) == [
      "adapter_config.json", "adapter_model.safetensors"]
  assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["r"] == 4
  assert json.loads((out / "metrics.json").read_text())["exported"]["peft"] == str(out / "peft_adapter")


def test_4_a_second_writer_is_refused_naming_the_holder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from train.run_dir import RunLock;"
       " RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", "run"],
      env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.time()
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host"):
      run(make_config(_settings(output_dir="run")))
    assert time.time() - t0 < 10  # at once, before loading anything
  finally:
    holder.kill()
    holder.wait()
  # Its holder was killed: the next run takes the lock over and says so.
  lock = RunLock(tmp_path / "run")
  assert f"left by pid {holder.pid}" in lock.acquire()
  with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):  # one writer, even in-process
    RunLock("run").acquire()
  lock.release()
  assert RunLock("run").acquire() is None  # released cleanly: nothing to take over


def test_5_export_peft_replaces_an_existing_export(tmp_path):
  params, adapters, config = make()
  dora_jax.export_peft(tmp_path, adapters, config, params=params)
  (tmp_path / "adapter_model.safetensors.tmp").write_bytes(b"left by a killed export")
  doubled = jax.tree.map(lambda x: 2 * x, adapters)
  dora_jax.export_peft(tmp_path, doubled, config, params=params)
  back, _ = dora_jax.import_peft(tmp_path, params)
  q = ("model", "layers_1", "self_attn", "q_proj", "lora_b")
  got, want = back, doubled
  for k in q:
    got, want = got[k], want[k]
  np.testing.assert_array_equal(got, want)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_5_a_kill_between_the_two_renames_of_an_export_is_repaired(tmp_path):
  final = tmp_path / "peft_adapter"
  replace_dir(final, lambda d: (d.mkdir(), (d / "v").write_text("1")))
  os.replace(final, tmp_path / ".peft_adapter.old-7")  # killed after the first rename
  (tmp_path / ".peft_adapter.tmp-7").mkdir()  # ... with the new export half-built
  recover_dir(final)
  assert (final / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["peft_adapter"]
  replace_dir(final, lambda d: (d.mkdir(), (d / "v").write_text("2")))
  assert (final / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["peft_adapter"]


def _flip_bytes(step_dir: Path, everywhere: bool = False, n: int = 16):
  """Flips n bytes in the middle of the largest array data file of a checkpoint step (which
  Orbax reads back silently as other numbers), or of every data file (``everywhere``: small
  arrays sit inside the index, whose damage Orbax reports)."""
  files = [p for p in (step_dir / "state").glob("**/d/*") if p.is_file()]
  if not everywhere:
    files = [max((p for p in files if "ocdbt.process_" in str(p)), key=lambda p: p.stat().st_size)]
  for f in files:
    b = bytearray(f.read_bytes())
    mid = len(b) // 2
    b[mid:mid + n] = bytes(x ^ 0xFF for x in b[mid:mid + n])
    f.write_bytes(bytes(b))


def test_6_damaged_checkpoints_are_detected_and_skipped(tmp_path):
  _, adapters, config = make()
  # An Adam moment large enough for its own data file (small arrays sit inside the index).
  mu = jnp.asarray(np.random.default_rng(0).standard_normal((64, 16)), jnp.float32)
  state = {"adapters": adapters, "rng": jax.random.key(0), "opt_state": {"mu": mu}}
  with TrainCheckpointer(tmp_path / "c", config, keep=4) as c:
    for step in (1, 2, 3):
      c.save(step, {**state, "data_state": {"at": step}})
  _flip_bytes(tmp_path / "c" / "3")
  (tmp_path / "c" / "2" / "record" / "metadata").write_text('{"step": 2, "arr')  # truncated JSON
  c = TrainCheckpointer(tmp_path / "c", config, keep=4)
  garbage = c.restore(3, target=state, verify=False)["opt_state"]["mu"]  # what a plain read gives
  assert not np.array_equal(garbage, mu)
  for step in (2, 3):
    with pytest.raises(CorruptCheckpointError) as e:
      c.restore(step, target=state)
    msg = str(e.value)
    assert f"Step {step} in" in msg and len(msg) < 400 and "TensorStore" not in msg
    assert "overwrite" not in msg  # never advise deleting the intact step 1
  restored, skipped = c.restore_latest(target=state)
  assert restored["step"] == 1 and restored["data_state"] == {"at": 1}
  assert [s for s, _ in skipped] == [3, 2]
  dest = c.set_aside([3, 2])
  assert sorted(p.name for p in dest.iterdir()) == ["2", "3"]  # kept, not deleted
  assert c.all_steps() == [1]
  assert c.save(2, {**state, "data_state": {"at": 2}}, force=True)  # the run goes on
  c.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax, on damage
def test_6_trainer_resumes_from_the_newest_intact_checkpoint(partial, tmp_path, monkeypatch):
  out = _copy_partial(partial, tmp_path, monkeypatch)
  _flip_bytes(out / "checkpoints" / "4", everywhere=True)
  summary, text = _run(output_dir="run", resume=True, stop_after=2)
  assert "checkpoint step 4 is damaged, skipped:" in text
  assert "resumed from step 2 in" in text and "(the newest intact checkpoint)" in text
  assert "--overwrite" not in text
  assert (out / "checkpoints.damaged" / "4").is_dir()  # kept, not deleted
  # Steps 3 and 4 ran again and saved over the damaged step's place.
  assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [1, 2, 3, 4]
  assert TrainCheckpointer(out / "checkpoints", None).all_steps() == [2, 4]
  assert summary["stopped_at"] == 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_7_a_signal_saves_the_last_step_and_stops(partial, tmp_path, monkeypatch, sig):
  """Ctrl-C and SIGTERM (preemption) alike: the step in flight finishes, is saved, the run stops."""
  out = _copy_partial(partial, tmp_path, monkeypatch)
  real_next = data_lib.BatchIterator.__next__
  calls = []

  def next_then_signal(self):
    calls.append(1)
    if len(calls) == 1:  # during step 5 of 6
      os.kill(os.getpid(), sig)
    return real_next(self)

  monkeypatch.setattr(data_lib.BatchIterator, "__next__", next_then_signal)
  handler = signal.getsignal(sig)
  buf = io.StringIO()
  with pytest.raises(StopRequested) as e, contextlib.redirect_stdout(buf):
    run(make_config(_settings(output_dir="run", resume=True)))
  assert e.value.signum == sig and isinstance(e.value, KeyboardInterrupt)
  name = signal.Signals(sig).name
  assert f"received {name}: finishing this step" in buf.getvalue()
  assert f"{name}: saved step 5 to {out / 'checkpoints'}; continue with --resume" in buf.getvalue()
  assert TrainCheckpointer(out / "checkpoints", None).all_steps() == [4, 5]
  assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
  assert len(calls) == 1 and signal.getsignal(sig) is handler  # stopped; handlers restored


def test_7_a_second_signal_stops_at_once():
  said = []
  with _StopSignals(said.append) as stop:
    with pytest.raises(StopRequested):  # outside the training loop: nothing to save, stop now
      os.kill(os.getpid(), signal.SIGTERM)
    stop.deferring = True
    os.kill(os.getpid(), signal.SIGINT)  # in the loop: noted, the step goes on
    assert stop.signum == signal.SIGINT and "send it again to stop at once" in said[0]
    with pytest.raises(StopRequested):  # again: at once
      os.kill(os.getpid(), signal.SIGINT)


def test_8_resume_says_when_it_starts_afresh_and_notices_new_data(partial, tmp_path, monkeypatch):
  assert "--resume: no checkpoint in" in partial[2] and "starting from step 0" in partial[2]
  _copy_partial(partial, tmp_path, monkeypatch)
  _corpus(tmp_path, variant=" again")  # new data at the same --task path
  with pytest.raises(ValueError, match="data_sha256"):
    _run(output_dir="run", resume=True)


# ---------------------------------------------------------------------------
# Fault 9: the library's bad inputs


def test_9_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"LoraConfig.target_modules='\(q_proj' is not a valid regex"):
    dora_jax.LoraConfig(target_modules="(q_proj")
  with pytest.raises(ValueError, match="LoraConfig.exclude_modules"):
    dora_jax.LoraConfig(target_modules="all-linear", exclude_modules="[")
  config = dora_jax.LoraConfig(r=np.int64(4), lora_alpha=np.float32(8.0), target_modules=["q"])
  assert type(config.r) is int and config.scale == 2.0 and json.loads(config.to_json())["r"] == 4
  for bad in (float("nan"), float("inf"), -np.inf):
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
      dora_jax.LoraConfig(lora_alpha=bad, target_modules=["q"])


def test_9_adapters_and_a_config_that_disagree_are_refused(tmp_path):
  params, adapters, config = make()  # DoRA adapters
  lora = dora_jax.LoraConfig(r=config.r, lora_alpha=config.lora_alpha,
                             target_modules=config.target_modules, use_dora=False)
  with pytest.raises(ValueError, match="has a DoRA magnitude but the config says use_dora=False"):
    dora_jax.tree.check_config_matches(adapters, lora)
  with pytest.raises(ValueError, match="use_dora=False"):
    dora_jax.save_adapters(tmp_path / "a", adapters, lora)
  with pytest.raises(ValueError, match="use_dora=False"):
    dora_jax.export_peft(tmp_path / "p", adapters, lora, params=params)
  dora_jax.tree.check_config_matches(adapters, config)


def test_9_unmerge_with_norms_of_the_wrong_length():
  params = {"fc": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}}
  config = dora_jax.LoraConfig(r=2, target_modules=["fc"], use_dora=True, init_lora_weights=False)
  adapters = dora_jax.init_adapters(jax.random.key(0), params, config)
  merged, norms = dora_jax.merge(params, adapters, config, return_norms=True)
  np.testing.assert_allclose(dora_jax.unmerge(merged, adapters, config, norms)["fc"]["kernel"],
                             params["fc"]["kernel"], atol=1e-5)
  with pytest.raises(ValueError, match=r"norm at 'fc' has shape \(4,\), but its DoRA magnitude has \(3,\)"):
    dora_jax.unmerge(merged, adapters, config, {"fc": jnp.ones(4)})


def test_9_import_peft_refuses_incomplete_files_and_nan(tmp_path):
  params, adapters, config = make()
  dora_jax.export_peft(tmp_path, adapters, config, params=params)
  weights = tmp_path / "adapter_model.safetensors"
  tensors = load_file(str(weights))
  save_file({k: v for k, v in tensors.items() if "v_proj" not in k}, str(weights))
  with pytest.raises(ValueError, match=r"incomplete.*model\.layers\.0\.self_attn\.v_proj"):
    dora_jax.import_peft(tmp_path, params)
  key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
  bad = dict(tensors)
  bad[key] = bad[key].copy()
  bad[key][0, 0] = np.nan
  save_file(bad, str(weights))
  with pytest.raises(ValueError, match=f"NaN or infinite values in \\['{key}'\\]"):
    dora_jax.import_peft(tmp_path, unscanned_params())


# ---------------------------------------------------------------------------
# Kill and resume, in subprocesses


def _env(cache: Path) -> dict:
  return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(cache)}  # the other cache settings: from os.environ


def _cmd(out: str, steps: int) -> list[str]:
  flags = {**_settings(steps=steps, eval_every=5, export="peft", output_dir=out), "resume": True}
  args = [sys.executable, "-m", "train"]
  for k, v in flags.items():
    args += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
  return args


def _last_step(out: Path) -> int:
  recs = [r for r in read_records(out / "metrics.jsonl") if "loss" in r]
  return recs[-1]["step"] if recs else 0


def _interrupt(cmd, cwd: Path, out: Path, env, how: str, rng: random.Random, log: Path) -> str:
  """Starts a trainer and interrupts it; returns its output. ``how``:

  * ``kill``: SIGKILL at a random moment after a random number of new steps;
  * ``kill-saving``: SIGKILL while Orbax writes a checkpoint (its temporary folder exists),
    after a random number of new steps;
  * ``kill-resuming``: SIGKILL as soon as it says where it resumes (before any new step);
  * ``term`` / ``int``: SIGTERM / SIGINT after its first new step: it must save and exit 143 / 130.
  """
  start = _last_step(out)
  with open(log, "w") as fh:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
  deadline, after = time.time() + 240, rng.randint(1, 3)
  ckpt_dir = out / "checkpoints"
  while proc.poll() is None and time.time() < deadline:
    if how == "kill-saving":
      names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
      if any("orbax-checkpoint-tmp" in n for n in names) and _last_step(out) >= start + after:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.0005)
      continue
    if how == "kill-resuming" and ("resumed from step" in log.read_text()
                                   or "starting from step 0" in log.read_text()):
      proc.send_signal(signal.SIGKILL)
      break
    if how == "kill" and _last_step(out) >= start + after:
      time.sleep(rng.uniform(0, 0.3))
      proc.send_signal(signal.SIGKILL)
      break
    if how in ("term", "int") and _last_step(out) > start:
      proc.send_signal(signal.SIGTERM if how == "term" else signal.SIGINT)
      break
    time.sleep(0.01)
  rc = proc.wait(timeout=240)
  text = log.read_text()
  if how.startswith("kill"):
    assert rc == -signal.SIGKILL, f"{how}: the run ended by itself (rc {rc}) before the kill:\n{text[-2000:]}"
  else:
    name, code = ("SIGTERM", 143) if how == "term" else ("SIGINT", 130)
    assert rc == code, f"{how}: rc {rc}\n{text[-2000:]}"
    saved = _last_step(out)
    assert f"{name}: saved step {saved} to" in text, text[-2000:]
    assert saved in TrainCheckpointer(out / "checkpoints", None).all_steps()
  return text


def _compare_runs(ref: Path, got: Path, steps: int):
  a = load_file(str(ref / "peft_adapter" / "adapter_model.safetensors"))
  b = load_file(str(got / "peft_adapter" / "adapter_model.safetensors"))
  assert a.keys() == b.keys() and a
  for k in a:  # bit for bit
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  sa = TrainCheckpointer(ref / "checkpoints", None).restore(steps)
  sb = TrainCheckpointer(got / "checkpoints", None).restore(steps)
  arrays = lambda s: {"trainable": s["trainable"], "opt_state": s["opt_state"],
                      "rng": jax.random.key_data(s["rng"])}
  assert jax.tree.structure(arrays(sa)) == jax.tree.structure(arrays(sb))
  for x, y in zip(jax.tree.leaves(arrays(sa)), jax.tree.leaves(arrays(sb))):  # adapters, Adam moments
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert sa["data_state"]["loader"] == sb["data_state"]["loader"]
  ra, rb = read_records(ref / "metrics.jsonl"), read_records(got / "metrics.jsonl")
  assert [r["step"] for r in rb if "loss" in r] == list(range(1, steps + 1))
  assert _same(ra, rb)
  ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, got))
  for key in ("before", "after"):
    assert _same(ma[key], mb[key]), key
  assert ma["evals"] == mb["evals"] and len(ma["evals"]) == (steps - 1) // 5
  assert ma["first_loss"] == mb["first_loss"] == ra[0]["loss"]
  assert ma["final_loss"] == mb["final_loss"]


def _kill_and_resume(tmp_path, cache, plan, steps, seed):
  _corpus(tmp_path)
  env = _env(cache)
  ref = subprocess.Popen(_cmd("ref", steps), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # uninterrupted, alongside
  out, rng, texts = tmp_path / "run", random.Random(seed), []
  for i, how in enumerate(plan):
    texts.append(_interrupt(_cmd("run", steps), tmp_path, out, env, how, rng, tmp_path / f"{i}.log"))
  last = subprocess.run(_cmd("run", steps), cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=240)
  assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
  ref_out = ref.communicate(timeout=240)[0]
  assert ref.returncode == 0, ref_out[-3000:]
  assert "no checkpoint in" in texts[0] and "starting from step 0" in texts[0]
  assert any("took over the lock" in t for t in texts[1:] + [last.stdout])  # after a SIGKILL
  _compare_runs(tmp_path / "ref", out, steps)
  return texts + [last.stdout]


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, compile_cache):
  """SIGKILL during a checkpoint write, SIGTERM, then a resume to the end: the adapters, the
  optimizer state, metrics.jsonl and metrics.json equal an uninterrupted run's (SIGINT takes
  SIGTERM's path: test_7 sends it in-process; the slow test below, to subprocesses)."""
  _kill_and_resume(tmp_path, compile_cache, ["kill-saving", "term"], steps=6, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_kill_and_resume_many_times(tmp_path, compile_cache, seed):
  """The extended version: nine interruptions of every kind, in a random order."""
  rng = random.Random(seed)
  plan = ["kill", "kill-saving", "kill-resuming", "term", "int", "kill", "kill-saving", "kill"]
  rng.shuffle(plan)
  _kill_and_resume(tmp_path, compile_cache, ["kill"] + plan, steps=30, seed=seed)
