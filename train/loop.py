"""The fine-tuning run: load, evaluate, train, checkpoint, evaluate, export.

Built on dora_jax's public API: ``LoraConfig``, ``init_adapters``, ``wrap``,
``merge``, ``kernel_layouts``, ``export_peft`` and the models in
``dora_jax.models``; the training state is saved by :class:`train.checkpoint.TrainCheckpointer`.
"""

from __future__ import annotations

import hashlib
import json
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

import dora_jax
from train import analysis
from train import mesh as mesh_lib
from train import steps as steps_lib
from train.checkpoint import CorruptCheckpointError, TrainCheckpointer
from train.config import TrainConfig
from train.evaluate import (  # noqa: F401
    evaluate, fmt as _fmt, generation_scorer, make_evaluator, make_score_step)
from train.export import base_model_path, export, plot_run  # noqa: F401
from train.run_dir import (
    METRICS_LINES,
    METRICS_SUMMARY,
    MetricsWriter,
    RunLock,
    read_records,
    remove_run_files,
    write_atomic,
)
from train.setup import (  # noqa: F401  (re-exported: the trainer's public helpers)
    DataSetup,
    ModelSetup,
    cached_base_norms,
    check_before_loading,
    lora_config,
    quantize_base,
    setup_data,
    setup_model,
    split_report,
    system_prompt,
    with_loss_positions,
)

logger = logging.getLogger("train")


# ---------------------------------------------------------------------------
# Fingerprints


def run_fingerprint(cfg: TrainConfig, data_sha256: str | None = None) -> dict[str, Any]:
  """The settings a resumed run must share with the one it continues (the TrainConfig fields
  declared with ``resume_key=True``), and the hash of its
  tokenized data (:func:`data_fingerprint`: new data at the same ``--task`` path differs)."""
  d = cfg.to_dict()
  out = {k: d[k] for k in cfg.resume_keys()}  # the fields marked resume_key where declared
  if data_sha256 is not None:
    out["data_sha256"] = data_sha256
  return out


def data_fingerprint(*parts: Any) -> str:
  """``"sha256:<hex>"`` over the names, dtypes, shapes and bytes of every array in ``parts``
  (dicts, tuples, arrays, None): the training and held-out rows exactly as the run uses them."""
  h = hashlib.sha256()

  def visit(x, name):
    if x is None:
      h.update(f"{name}:None;".encode())
    elif isinstance(x, Mapping):
      for k in sorted(x):
        visit(x[k], f"{name}/{k}")
    elif isinstance(x, (tuple, list)):
      for i, v in enumerate(x):
        visit(v, f"{name}/{i}")
    else:
      a = np.ascontiguousarray(x)
      h.update(f"{name}:{a.dtype}:{a.shape};".encode())
      h.update(a.reshape(-1).view(np.uint8))

  for i, part in enumerate(parts):
    visit(part, str(i))
  return "sha256:" + h.hexdigest()



# ---------------------------------------------------------------------------
# The run


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0,
              dynamic_ncols=True, unit="step", file=sys.stderr)


class StopRequested(KeyboardInterrupt):
  """SIGINT or SIGTERM stopped the run (after saving its last finished step when it could)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


class _StopSignals:
  """SIGINT (Ctrl-C) and SIGTERM (preemption on clusters and TPU VMs) alike: inside the training
  loop (``deferring``) the first one lets the current step finish, then the loop saves and
  stops; anywhere else, or on a second signal, the run stops at once (:class:`StopRequested`)."""

  def __init__(self, say):
    self.say = say
    self.signum: int | None = None
    self.deferring = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "_StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    """Whether to stop after this step; with several processes, whether any process got a
    signal (every process must save and stop at the same step, or the collectives hang)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
      if self.signum is None and signums.any():
        self.signum = int(signums[signums > 0][0])
    return self.signum is not None

  def _handle(self, signum, frame) -> None:
    if self.deferring and self.signum is None:
      self.signum = signum
      self.say(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving"
               " (send it again to stop at once, without saving)")
      return
    raise StopRequested(signum)


def run(cfg: TrainConfig) -> dict[str, Any]:
  """Runs a fine-tune; returns (and writes to ``output_dir/metrics.json``) the summary.

  The output directory is locked for the run (:class:`train.run_dir.RunLock`); SIGINT and
  SIGTERM save the last finished step and raise :class:`StopRequested`.
  """
  t_start = time.time()
  check_before_loading(cfg)
  # --- devices
  mesh_lib.initialize_distributed(cfg.coordinator_address or None, cfg.num_processes or None,
                                 cfg.process_id if cfg.process_id >= 0 else None)
  out = Path(cfg.output_dir).absolute()  # resolved once: Orbax needs absolute paths
  say = (lambda *a: print(*a, flush=True)) if jax.process_index() == 0 else (lambda *a: None)
  lock = RunLock(out) if jax.process_index() == 0 else None
  took_over = lock.acquire() if lock else None  # RunLockedError: another trainer writes here
  try:
    if took_over:
      say(took_over)
    if cfg.offload_optimizer and not dora_jax.sharding.supports_host_offload():
      raise SystemExit(f"--offload-optimizer: the {jax.default_backend()} backend has no"
                       f" '{dora_jax.sharding.HOST_MEMORY_KIND}' memory to keep the optimizer state"
                       " in; drop the flag (the state then stays in device memory).")
    mesh = mesh_lib.make_mesh(cfg.mesh or None)
    multiple = mesh_lib.batch_size_multiple(mesh)
    if cfg.batch_size % (multiple * cfg.grad_accum):
      raise ValueError(
          f"batch_size={cfg.batch_size} must be a multiple of grad_accum x (data x fsdp) ="
          f" {cfg.grad_accum} x {multiple} on mesh {dict(mesh.shape)}.")
    with mesh_lib.use_mesh(mesh), _StopSignals(say) as stop:
      return _run(cfg, mesh, t_start, out, say, stop)
  finally:
    if lock:
      lock.release()


def _run(cfg: TrainConfig, mesh, t_start: float, out: Path, say, stop: _StopSignals) -> dict[str, Any]:
  primary = jax.process_index() == 0
  init_key, rng = jax.random.split(jax.random.key(cfg.seed))
  ms = setup_model(cfg, mesh, init_key, say, t_start)
  tracker = analysis.make_tracker(
      ms.trainable, ms.params, ms.lcfg, cfg.track_modules if cfg.track_decomposition else None,
      model=ms.model if cfg.scan_layers else None)
  ds = setup_data(cfg, ms.tokenizer, say)
  steps = _make_steps(cfg, mesh, ms, ds, say)
  state = TrainState(ms.trainable, jax.jit(steps.tx.init, out_shardings=steps.o_sh)(ms.trainable), rng)
  slot, slots = mesh_lib.batch_process_slot(mesh)
  iterator = steps.iterator(ds.train_arrays, cfg.batch_size, cfg.seed, slot, slots)
  ckpt = _checkpointer(cfg, out, run_fingerprint(cfg, data_fingerprint(ds.train_arrays, ds.eval_set)),
                       primary, say)
  start_step, run_state = _restore(ckpt, state, iterator, out, resume=cfg.resume, say=say)

  # --- evaluate before (once per run: a resumed process takes it from the checkpoint)
  if "before" in run_state:
    before = run_state["before"]
  else:
    t0 = time.time()
    before = steps.evaluate(ms.frozen, state.trainable)
    before["seconds"] = round(time.time() - t0, 1)
  say("before training: " + _fmt(before) + (f" (majority class {ds.majority:.1%})" if ds.majority else ""))

  writer = MetricsWriter(out, cfg.tensorboard, resume_step=start_step, primary=primary)
  intervals = [e for e in run_state.get("evals", []) if e["step"] <= start_step]
  t_loop = time.time()
  history, step = _train(cfg, ms.frozen, state, steps, iterator, ckpt, writer, stop, tracker,
                         start_step=start_step, before=before, intervals=intervals, out=out,
                         slots=slots, say=say)
  train_seconds = time.time() - t_loop

  records = read_records(out / METRICS_LINES) if primary else history
  losses = [r["loss"] for r in records if "loss" in r]  # the whole run's, whichever process ran them
  if step < cfg.steps:
    partial = {"stopped_at": step, "before": before, "evals": intervals,
               "first_loss": losses[0] if losses else None}
    if primary:
      write_atomic(out / METRICS_SUMMARY, json.dumps(partial, indent=2, default=str))
    say(f"stopped after step {step} (--stop-after); continue with --resume")
    return partial

  # --- evaluate after, export
  t0 = time.time()
  after = steps.evaluate(ms.frozen, state.trainable)
  after["seconds"] = round(time.time() - t0, 1)
  say("after training:  " + _fmt(after))
  exported = export(cfg.export, out, ms.base, ms.params, state.trainable, ms.lcfg, cfg.model)
  step_seconds = [r["step_seconds"] for r in records if "step_seconds" in r]
  summary = {
      "config": cfg.to_dict(), "model": {"params": ms.n_base, **ms.base.config.to_hf_dict()},
      "trainable_params": ms.n_train, "before": before, "after": after, "evals": intervals,
      "majority_class_rate": ds.majority,
      "first_loss": losses[0] if losses else None,
      "final_loss": float(np.mean(losses[-10:])) if losses else None,
      "train_seconds_this_process": round(train_seconds, 1),
      "median_step_seconds": float(np.median(step_seconds[1:] or [0.0])),
      "wall_seconds": round(time.time() - t_start, 1), "resumed_from": start_step or None,
      "exported": exported, "optimizer_state_memory": sorted(
          {str(x.sharding.memory_kind) for x in jax.tree.leaves(state.opt_state)}),
      "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
  }
  if primary:
    if tracker is not None:
      summary["decomposition_slopes"] = analysis.plot_at_end(out, cfg.method, say)
    write_atomic(out / METRICS_SUMMARY, json.dumps(summary, indent=2, default=str))
    plot_run(out, ds.task.kind)
  return summary


# ---------------------------------------------------------------------------
# Pieces of the run


@dataclasses.dataclass
class TrainState:
  """What the train step updates (and a checkpoint holds, with the data position)."""

  trainable: Any
  opt_state: Any
  rng: Any


@dataclasses.dataclass
class Steps:
  """The jitted steps of a run and what they need: ``train_step``, ``evaluate(frozen,
  trainable) -> record``, the optimizer ``tx`` and its ``schedule``, the optimizer state's
  shardings ``o_sh`` (in pinned host memory with ``--offload-optimizer``), and the data loader's
  class."""

  tx: Any
  schedule: Any
  o_sh: Any
  train_step: Any
  evaluate: Any
  batch: Any  # local batch -> global, sharded batch
  iterator: Any


def _generation(cfg: TrainConfig, ms: ModelSetup, ds: DataSetup, say):
  """The sample generations of a prompt/response task's evaluations (None for other tasks,
  with ``--eval-generate 0``, or with several processes)."""
  if ds.task.kind != "generation" or not cfg.eval_generate or not ds.eval_examples:
    return None
  if jax.process_count() > 1:
    say("--eval-generate: sample generations run on a single process; skipped")
    return None
  return generation_scorer(ds.eval_examples, ms.model, ms.tokenizer, ms.lcfg,
                           chat_template=cfg.chat_template, system_prompt=system_prompt(cfg),
                           n_generate=cfg.eval_generate, n_show=cfg.eval_samples, seq_len=cfg.seq_len,
                           say=say)


def _make_steps(cfg: TrainConfig, mesh, ms: ModelSetup, ds: DataSetup, say) -> Steps:
  from train import data as data_lib
  sh = dora_jax.sharding
  tx, schedule = steps_lib.make_optimizer(
      learning_rate=cfg.learning_rate, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
      min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
      method=cfg.method, loraplus_lr_ratio=cfg.loraplus_lr_ratio)
  o_dev = sh.opt_state_shardings(tx, ms.t_sh, ms.trainable)
  o_sh = sh.host_offloaded(o_dev) if cfg.offload_optimizer else o_dev  # where it lives between steps
  forward = steps_lib.make_forward(ms.model, cfg.method, ms.lcfg)
  rep, b_sh = sh.replicated(mesh), mesh_lib.batch_sharding(mesh)
  train_step = steps_lib.make_train_step(
      forward, tx, cfg.grad_accum, jit_kwargs=dict(
          in_shardings=(ms.f_sh, ms.t_sh, o_sh, b_sh, rep), out_shardings=(ms.t_sh, o_sh, rep)),
      opt_state_to_device=(lambda st: sh.to_device(st, o_dev)) if cfg.offload_optimizer else None)
  score_step = make_score_step(forward, ds.eval_set[1]) if ds.task.kind == "label" else None
  evaluator = make_evaluator(
      ds.task, ds.eval_set, steps_lib.make_eval_step(forward), score_step,
      batch_size=cfg.eval_batch_size, progress=cfg.progress,
      multiple=mesh_lib.batch_size_multiple(mesh),
      place=lambda b: jax.device_put(b, rep),  # eval rows: the same on every process
      generation=_generation(cfg, ms, ds, say))
  iterator = lambda arrays, bs, seed, slot, slots: data_lib.BatchIterator(
      arrays, bs, seed=seed, process_index=slot, process_count=slots)
  return Steps(tx, schedule, o_sh, train_step, evaluator, lambda b: mesh_lib.shard_batch(b, mesh), iterator)


def _checkpointer(cfg: TrainConfig, out: Path, fingerprint, primary: bool, say) -> TrainCheckpointer:
  """The run's checkpointer; with ``--overwrite`` the previous run's files are deleted first."""
  ckpt = TrainCheckpointer(out / "checkpoints", fingerprint, keep=cfg.keep_checkpoints,
                           save_every=cfg.save_every or cfg.steps, overwrite=cfg.overwrite)
  if cfg.overwrite:
    removed = remove_run_files(out) if primary else []
    if ckpt.deleted_steps or removed:
      say(f"--overwrite: deleted the previous run's checkpoints {ckpt.deleted_steps}"
          + (f" and {', '.join(removed)}" if removed else "") + f" in {out}")
  return ckpt


def _restore(ckpt: TrainCheckpointer, state: TrainState, iterator, out: Path, *, resume: bool,
             say) -> tuple[int, dict[str, Any]]:
  """``(start step, run state)``: restores ``state`` and the loader from the newest intact
  checkpoint (``--resume``), refusing to write over an existing run without it."""
  if ckpt.all_steps() and not resume:
    raise SystemExit(
        f"{out / 'checkpoints'} already holds checkpoints of a run with these settings (steps"
        f" {ckpt.all_steps()}): pass --resume to continue it, or use another --output-dir"
        " (--overwrite would delete them and start afresh).")
  if not ckpt.all_steps():
    if resume:
      say(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting from step 0")
    return 0, {}
  try:
    restored, skipped = ckpt.restore_latest(
        target={"trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng})
  except CorruptCheckpointError as e:
    raise SystemExit(
        f"{e}\nNothing was deleted. To start this run afresh, use another --output-dir (or move"
        f" {out / 'checkpoints'} aside).") from e
  for s, why in skipped:
    say(f"checkpoint step {s} is damaged, skipped: {why}")
  if skipped:
    dest = ckpt.set_aside([s for s, _ in skipped])
    say(f"moved the damaged step(s) {[s for s, _ in skipped]} to {dest} (kept, not deleted)")
  start_step = restored.pop("step")
  run_state = restored.pop("data_state")
  iterator.restore(run_state["loader"])
  state.trainable, state.opt_state, state.rng = restored["trainable"], restored["opt_state"], restored["rng"]
  say(f"resumed from step {start_step} in {out / 'checkpoints'}"
      + (" (the newest intact checkpoint)" if skipped else ""))
  return start_step, run_state


def _train(cfg: TrainConfig, frozen, state: TrainState, steps: Steps, iterator, ckpt, writer, stop,
           tracker, *, start_step: int, before, intervals: list, out: Path, slots: int,
           say) -> tuple[list[dict[str, Any]], int]:
  """The training loop from ``start_step``: steps, metrics, evaluations, checkpoints, signals.

  Returns ``(this process's step records, the last step run)``."""
  bar = _progress(cfg.steps, start_step, cfg.progress)
  history: list[dict[str, Any]] = []
  tokens_seen, t_loop, step, done = 0, time.time(), start_step, start_step
  stop_at = cfg.steps if not cfg.stop_after else min(cfg.steps, start_step + cfg.stop_after)

  def save(at: int, force: bool) -> bool:
    writer.sync()  # the metrics lines up to this step are on disk before the checkpoint is
    return ckpt.save(at, {"trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng,
                          "data_state": {"loader": iterator.state(), "before": before, "evals": intervals}},
                     force=force)

  try:
    stop.deferring = True
    for step in range(start_step + 1, stop_at + 1):
      local_batch = next(iterator)
      t0 = time.time()
      state.trainable, state.opt_state, m = steps.train_step(
          frozen, state.trainable, state.opt_state, steps.batch(local_batch),
          jax.random.fold_in(state.rng, step))
      loss = float(m["loss"])
      dt = time.time() - t0
      if not math.isfinite(loss):
        kept = (f"The checkpoints up to step {ckpt.latest_step()} are kept in {out / 'checkpoints'}."
                if ckpt.latest_step() is not None else "No checkpoint was saved.")
        raise FloatingPointError(
            f"loss became {loss} at step {step}. {kept} --resume continues only with the same"
            " settings: to retry with a lower --learning-rate or --grad-clip, start a new run in"
            " another --output-dir.")
      done = step
      tokens = int(local_batch["attention_mask"].sum()) * slots
      tokens_seen += tokens
      rec = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
             "lr": float(steps.schedule(step - 1)), "tokens": tokens, "loss_tokens": int(m["tokens"]),
             "step_seconds": round(dt, 4), "tokens_per_s": round(tokens / max(dt, 1e-9), 1)}
      history.append(rec)
      if step % cfg.log_every == 0 or step == 1:
        writer.write(rec)
      if tracker is not None and (step % cfg.track_decomposition == 0 or step == cfg.steps):
        for r in tracker(step, state.trainable):
          writer.write(r)
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / max(time.time() - t_loop, 1e-9):,.0f}")
      bar.update(1)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        ev = steps.evaluate(frozen, state.trainable)
        intervals.append({"step": step, **ev})
        writer.write({"step": step, **{f"eval_{k}" if not k.startswith("eval") else k: v for k, v in ev.items()}})
        bar.write(f"step {step}: " + _fmt(ev))
      saved = save(step, force=step in (cfg.steps, stop_at))
      if stop.requested():
        if not saved:
          save(step, force=True)
        say(f"\n{signal.Signals(stop.signum).name}: saved step {step} to {out / 'checkpoints'};"
            " continue with --resume")
        raise StopRequested(stop.signum)
  except KeyboardInterrupt as e:
    if stop.signum is None or getattr(e, "signum", None) != stop.signum or done != step:
      ckpt.wait()
      say(f"\nstopped during step {step}; the latest checkpoint is step {ckpt.latest_step()}"
          " (continue with --resume)")
    raise
  finally:
    stop.deferring = False
    bar.close()
    writer.close()
    ckpt.close()
  return history, step

