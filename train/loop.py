"""The fine-tuning run: load, evaluate, train, checkpoint, evaluate, export.

Built on dora_jax's public API: ``LoraConfig``, ``init_adapters``, ``wrap``,
``merge``, ``kernel_layouts``, ``export_peft`` and the models in
``dora_jax.models``; the training state is saved by :class:`train.checkpoint.TrainCheckpointer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import dora_jax
from dora_jax.models.llama import Llama
from train import data as data_lib
from train import mesh as mesh_lib
from train import steps as steps_lib
from train.checkpoint import CorruptCheckpointError, TrainCheckpointer
from train.config import TrainConfig
from train.modeling import load_base_model
from train.run_dir import (
    METRICS_LINES,
    METRICS_SUMMARY,
    MetricsWriter,
    RunLock,
    read_records,
    recover_dir,
    remove_run_files,
    replace_dir,
    write_atomic,
)

logger = logging.getLogger("train")



# ---------------------------------------------------------------------------
# Setup pieces


def lora_config(cfg: TrainConfig) -> dora_jax.LoraConfig | dora_jax.VeraConfig | None:
  """The adapter config of a run: a ``LoraConfig`` (dora, lora), a ``VeraConfig`` (vera,
  dvora: ``use_dora``), or None for full fine-tuning."""
  if cfg.method == "full":
    return None
  targets = cfg.targets  # names (a tuple), 'all-linear' or a regex (a str): nothing guessed
  if cfg.method in ("vera", "dvora"):
    return dora_jax.VeraConfig(
        r=cfg.rank, target_modules=targets, projection_prng_key=cfg.projection_prng_key,
        vera_dropout=cfg.dropout, d_initial=cfg.d_initial, use_dora=cfg.method == "dvora")
  return dora_jax.LoraConfig(
      r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.dropout,
      use_dora=cfg.method == "dora", use_rslora=cfg.rslora)


def quantize_base(params, method: str, layouts, shardings) -> tuple[Any, Any]:
  """``(quantized params, their shardings)``: every linear kernel but ``lm_head`` quantized
  (:func:`dora_jax.quantize`, QLoRA's choice), each straight into the shards of the kernel it
  replaces (:func:`dora_jax.quantized_param_shardings`)."""
  qparams = dora_jax.quantize(params, method=method, layouts=layouts, shardings=shardings)
  return qparams, dora_jax.quantized_param_shardings(qparams, shardings)


def cached_base_norms(params, adapters, adapter_shardings) -> tuple[Any, Any]:
  """``(||W0||²_c per DoRA adapter, their shardings)``, or ``(None, None)`` without DoRA.

  :func:`dora_jax.linen.base_norms` computed once under ``jit``, each ``[*stack, O]`` sharded
  like its magnitude (:func:`dora_jax.sharding.adapter_shardings`); a quantized base gives the
  dequantized kernel's norms (QDoRA)."""
  from dora_jax import linen, tree as tree_lib

  norm_sh = {path: {linen.NORM_KEY: ad[dora_jax.variants.MAGNITUDE]}
             for path, ad in tree_lib.flatten_adapters(adapter_shardings).items()
             if dora_jax.variants.MAGNITUDE in ad}
  if not norm_sh:
    return None, None
  n_sh = tree_lib.unflatten(norm_sh)
  return jax.jit(linen.base_norms, out_shardings=n_sh)(params, adapters), n_sh


def split_report(examples, eval_size: float, n_eval: int, n_train: int, train_size: int) -> str:
  """One line saying how the task's rows became train and eval examples."""
  n, distinct = len(examples), len(set(examples))
  spec = f"{eval_size:g} of the distinct" if eval_size < 1 else f"{int(eval_size)}"
  dup = f" ({n - distinct} exact duplicates count once)" if n > distinct else ""
  left_out = n - n_eval - n_train if not train_size else None
  cap = f", capped at --train-size {train_size}" if train_size else ""
  rest = (f"; {left_out} copies of eval examples left out of train" if left_out else "")
  return (f"split: {n} examples, {distinct} distinct{dup}; eval = {spec} -> {n_eval} (stratified by"
          f" label where there are labels), train = the other {n_train}{cap}{rest}")


def system_prompt(cfg: TrainConfig) -> str | None:
  """The data pipeline's ``system_prompt``: None keeps the template's default."""
  return {"default": None, "none": ""}.get(cfg.system_prompt, cfg.system_prompt)


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


def with_loss_positions(arrays: dict[str, np.ndarray], k: int | None) -> dict[str, np.ndarray]:
  """Adds ``logits_at [N, K]`` so the LM head runs only where the loss is."""
  if k is None:
    return arrays
  return {**arrays, "logits_at": steps_lib.loss_positions(arrays["loss_mask"], k)}


# ---------------------------------------------------------------------------
# Evaluation


def evaluate(task, eval_set, frozen, trainable, eval_step, score_step, cfg: TrainConfig,
             multiple: int = 1, place=lambda b: b) -> dict[str, float]:
  """Accuracy (label tasks: the label continuation with the highest likelihood) or
  perplexity (text and generation tasks) on the held-out set.

  Every process evaluates the whole held-out set (rows replicated; ``multiple`` rounds the
  batch up so it splits over the mesh's batch axes)."""
  bs = -(-cfg.eval_batch_size // multiple) * multiple
  from tqdm.auto import tqdm
  bar = lambda n: tqdm(range(0, n, bs), desc="evaluating", unit="batch", leave=False, file=sys.stderr,
                       disable=not cfg.progress or jax.process_index() != 0, dynamic_ncols=True)
  if task.kind == "label":
    arrays, label_ids, gold = eval_set
    n = arrays["input_ids"].shape[0]
    scores = []
    for i in bar(n):
      batch = place(steps_lib.pad_rows({k: v[i:i + bs] for k, v in arrays.items()}, bs))
      scores.append(np.asarray(score_step(frozen, trainable, batch))[: min(bs, n - i)])
    scores = np.concatenate(scores)
    if label_ids is None:  # one row per (example, label): summed log-likelihood of the label
      scores = scores.reshape(-1, len(task.labels))
    pred = scores.argmax(-1)
    return {"accuracy": float(np.mean(pred == gold)), "eval_examples": int(len(gold))}
  n = eval_set["input_ids"].shape[0]
  total, count = 0.0, 0.0
  for i in bar(n):
    batch = place(steps_lib.pad_rows({k: v[i:i + bs] for k, v in eval_set.items()}, bs))
    nll, cnt = eval_step(frozen, trainable, batch)
    total += float(np.sum(nll))
    count += float(np.sum(cnt))
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "eval_tokens": int(count)}


def make_score_step(forward, label_ids: np.ndarray | None):
  """Label scores per row: fast path (each label one token: logits of those tokens at the
  last prompt position) or the summed log-likelihood of the label tokens."""
  if label_ids is not None:
    ids = jnp.asarray(label_ids)

    def fast(frozen, trainable, batch):
      logits = forward(frozen, trainable, batch, None, False)[:, 0]  # [B, V] at logits_at
      return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, ids]

    return jax.jit(fast)

  eval_step = steps_lib.make_eval_step(forward)
  return jax.jit(lambda f, t, b: -eval_step(f, t, b)[0])


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
  sh = dora_jax.sharding
  multiple = mesh_lib.batch_size_multiple(mesh)
  primary = jax.process_index() == 0

  # --- model (loaded into its shardings), data
  def shardings_for(config):
    abstract = sh.abstract_params(Llama(config, scan_layers=cfg.scan_layers), jnp.zeros((1, 8), jnp.int32))
    return sh.param_shardings(abstract, mesh)

  base = load_base_model(cfg, shardings_for)
  model = Llama(base.config, dtype=jnp.dtype(cfg.dtype), scan_layers=cfg.scan_layers, remat=cfg.remat)
  p_sh = shardings_for(base.config)
  params = base.params
  n_base = dora_jax.count_params(params)
  tokenizer = base.tokenizer
  say(f"model {cfg.model}: {base.config.num_params() / 1e6:.1f}M params ({time.time() - t_start:.1f}s to load)")

  task = data_lib.load_task(cfg.task, prompt_field=cfg.prompt_field, response_field=cfg.response_field,
                            text_field=cfg.text_field, label_field=cfg.label_field)
  train_ex, eval_ex = data_lib.split_examples(task.examples, cfg.eval_size, cfg.seed)
  if cfg.train_size:
    train_ex = train_ex[: cfg.train_size]
  fmt = {"chat_template": cfg.chat_template, "system_prompt": system_prompt(cfg)}
  train_arrays = data_lib.build_dataset(task, train_ex, tokenizer, cfg.seq_len, packing=cfg.packing, **fmt)
  loss_k = None
  if task.kind != "text" and not cfg.packing:
    loss_k = int(train_arrays["loss_mask"].sum(1).max())
  train_arrays = with_loss_positions(train_arrays, loss_k)
  n_rows = train_arrays["input_ids"].shape[0]
  say(split_report(task.examples, cfg.eval_size, len(eval_ex), len(train_ex), cfg.train_size))
  say(f"task {cfg.task}: {len(train_ex)} train / {len(eval_ex)} eval examples, {n_rows} rows of "
      f"{cfg.seq_len} tokens" + (f", loss on ≤{loss_k} positions per row" if loss_k else ""))

  if task.kind == "label":
    label_ids = data_lib.label_token_ids(tokenizer, task.labels, **fmt)
    if label_ids is not None:
      rows = data_lib.prompt_rows(task, eval_ex, tokenizer, cfg.seq_len, **fmt)
      rows = {**rows, "logits_at": (rows["attention_mask"].sum(1, keepdims=True) - 1).astype(np.int32)}
    else:
      rows = data_lib.label_choice_rows(task, eval_ex, tokenizer, cfg.seq_len, **fmt)
    gold = np.array([ex.label_id for ex in eval_ex])
    eval_set = (rows, label_ids, gold)
    majority = data_lib.majority_class_rate(gold)
  else:
    eval_set = data_lib.build_dataset(task, eval_ex, tokenizer, cfg.seq_len, packing=False, **fmt)
    majority = None

  # --- adapters, optimizer
  lcfg = lora_config(cfg)
  key = jax.random.key(cfg.seed)
  init_key, rng = jax.random.split(key)
  if lcfg is None:
    frozen, trainable, f_sh, t_sh = {}, params, {}, p_sh
  else:
    layouts = dora_jax.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
    q_sh = p_sh
    if cfg.quantize != "none":
      t0 = time.time()
      n_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
      params, q_sh = quantize_base(params, cfg.quantize, layouts, p_sh)
      base.params = None  # let the full-precision copy go (exports merge from the quantized base)
      say(f"quantized the base to {cfg.quantize}: {n_bytes / 2**20:.0f} MiB -> "
          f"{sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20:.0f} MiB"
          f" ({time.time() - t0:.1f}s)")
    # Adapter shardings follow the full-precision kernels' (a quantized kernel shards like them).
    adapters, a_sh = sh.init_adapters_sharded(init_key, params, lcfg, p_sh, mesh, layouts=layouts,
                                              replicate=cfg.replicate_adapters)
    norms, n_sh = cached_base_norms(params, adapters, a_sh)
    frozen, trainable = steps_lib.frozen_inputs(params, norms), adapters
    f_sh, t_sh = steps_lib.frozen_inputs(q_sh, n_sh), a_sh
  n_train = dora_jax.count_params(trainable) if lcfg is None else sum(
      x.size for x, m in zip(jax.tree.leaves(trainable), jax.tree.leaves(dora_jax.trainable_mask(trainable)))
      if m)  # VeRA's shared projections are frozen
  say(f"method {cfg.method}: {n_train:,} trainable parameters ({100 * n_train / n_base:.3f}% of {n_base:,})")

  tx, schedule = steps_lib.make_optimizer(
      learning_rate=cfg.learning_rate, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
      min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
      method=cfg.method)
  o_sh = sh.opt_state_shardings(tx, t_sh, trainable)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
  forward = steps_lib.make_forward(model, cfg.method, lcfg)
  rep, b_sh = sh.replicated(mesh), mesh_lib.batch_sharding(mesh)
  place = lambda b: jax.device_put(b, rep)  # eval rows: the same on every process
  train_step = steps_lib.make_train_step(forward, tx, cfg.grad_accum, jit_kwargs=dict(
      in_shardings=(f_sh, t_sh, o_sh, b_sh, rep), out_shardings=(t_sh, o_sh, rep)))
  eval_step = steps_lib.make_eval_step(forward)
  score_step = make_score_step(forward, eval_set[1]) if task.kind == "label" else None
  slot, slots = mesh_lib.batch_process_slot(mesh)
  iterator = data_lib.BatchIterator(train_arrays, cfg.batch_size, seed=cfg.seed,
                                    process_index=slot, process_count=slots)

  # --- checkpoints / resume
  data_sha256 = data_fingerprint(train_arrays, eval_set)
  ckpt = TrainCheckpointer(out / "checkpoints", run_fingerprint(cfg, data_sha256),
                           keep=cfg.keep_checkpoints, save_every=cfg.save_every or cfg.steps,
                           overwrite=cfg.overwrite)
  if cfg.overwrite:
    removed = remove_run_files(out) if primary else []
    if ckpt.deleted_steps or removed:
      say(f"--overwrite: deleted the previous run's checkpoints {ckpt.deleted_steps}"
          + (f" and {', '.join(removed)}" if removed else "") + f" in {out}")
  start_step, run_state = 0, {}
  if ckpt.all_steps() and not cfg.resume:
    raise SystemExit(
        f"{out / 'checkpoints'} already holds checkpoints of a run with these settings (steps"
        f" {ckpt.all_steps()}): pass --resume to continue it, or use another --output-dir"
        " (--overwrite would delete them and start afresh).")
  if ckpt.all_steps():
    try:
      restored, skipped = ckpt.restore_latest(
          target={"trainable": trainable, "opt_state": opt_state, "rng": rng})
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
    trainable, opt_state, rng = restored["trainable"], restored["opt_state"], restored["rng"]
    say(f"resumed from step {start_step} in {out / 'checkpoints'}"
        + (" (the newest intact checkpoint)" if skipped else ""))
  elif cfg.resume:
    say(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting from step 0")

  # --- evaluate before (once per run: a resumed process takes it from the checkpoint)
  if "before" in run_state:
    before = run_state["before"]
  else:
    t0 = time.time()
    before = evaluate(task, eval_set, frozen, trainable, eval_step, score_step, cfg, multiple, place)
    before["seconds"] = round(time.time() - t0, 1)
  say("before training: " + _fmt(before) + (f" (majority class {majority:.1%})" if majority else ""))

  # --- train
  writer = MetricsWriter(out, cfg.tensorboard, resume_step=start_step, primary=primary)
  bar = _progress(cfg.steps, start_step, cfg.progress)
  history: list[dict[str, Any]] = []
  intervals: list[dict[str, Any]] = [e for e in run_state.get("evals", []) if e["step"] <= start_step]
  tokens_seen, t_loop, step, done = 0, time.time(), start_step, start_step
  stop_at = cfg.steps if not cfg.stop_after else min(cfg.steps, start_step + cfg.stop_after)

  def save(at: int, force: bool) -> bool:
    writer.sync()  # the metrics lines up to this step are on disk before the checkpoint is
    return ckpt.save(at, {"trainable": trainable, "opt_state": opt_state, "rng": rng, "data_state": {
        "loader": iterator.state(), "before": before, "evals": intervals}}, force=force)

  try:
    stop.deferring = True
    for step in range(start_step + 1, stop_at + 1):
      local_batch = next(iterator)
      batch = mesh_lib.shard_batch(local_batch, mesh)
      step_rng = jax.random.fold_in(rng, step)
      t0 = time.time()
      trainable, opt_state, m = train_step(frozen, trainable, opt_state, batch, step_rng)
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
             "lr": float(schedule(step - 1)), "tokens": tokens, "loss_tokens": int(m["tokens"]),
             "step_seconds": round(dt, 4), "tokens_per_s": round(tokens / max(dt, 1e-9), 1)}
      history.append(rec)
      if step % cfg.log_every == 0 or step == 1:
        writer.write(rec)
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / max(time.time() - t_loop, 1e-9):,.0f}")
      bar.update(1)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        ev = evaluate(task, eval_set, frozen, trainable, eval_step, score_step, cfg, multiple, place)
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
  after = evaluate(task, eval_set, frozen, trainable, eval_step, score_step, cfg, multiple, place)
  after["seconds"] = round(time.time() - t0, 1)
  say("after training:  " + _fmt(after))
  exported = export(cfg, out, base, params, trainable, lcfg)

  step_seconds = [r["step_seconds"] for r in records if "step_seconds" in r]
  summary = {
      "config": cfg.to_dict(), "model": {"params": n_base, **base.config.to_hf_dict()},
      "trainable_params": n_train, "before": before, "after": after, "evals": intervals,
      "majority_class_rate": majority,
      "first_loss": losses[0] if losses else None,
      "final_loss": float(np.mean(losses[-10:])) if losses else None,
      "train_seconds_this_process": round(train_seconds, 1),
      "median_step_seconds": float(np.median(step_seconds[1:] or [0.0])),
      "wall_seconds": round(time.time() - t_start, 1), "resumed_from": start_step or None,
      "exported": exported, "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
  }
  if primary:
    write_atomic(out / METRICS_SUMMARY, json.dumps(summary, indent=2, default=str))
    plot_run(out, task.kind)
  return summary


def export(cfg, out: Path, base, params, trainable, lcfg) -> dict[str, str]:
  """Exports the merged model (HF-style safetensors dir) and/or the PEFT adapter."""
  from dora_jax.models import hf

  done = {}
  primary = jax.process_index() == 0
  if cfg.export in ("merged", "both"):
    merged = trainable if lcfg is None else dora_jax.merge(params, trainable, lcfg)
    path = out / "merged"
    if primary:
      recover_dir(path)  # what an export killed midway left
      hf.save_pretrained(path, base.config, jax.device_get(merged), tokenizer=base.tokenizer)
    done["merged"] = str(path)
  if cfg.export in ("peft", "both") and lcfg is not None:
    path = out / "peft_adapter"
    host = jax.device_get(trainable)
    if primary:
      replace_dir(path, lambda tmp: dora_jax.export_peft(
          tmp, host, lcfg, params=params, base_model_name_or_path=base_model_path(cfg.model)))
    done["peft"] = str(path)
  return done


def base_model_path(model: str) -> str:
  """The PEFT export's ``base_model_name_or_path``: a directory ``from_pretrained`` loads (the bundled
  SmolLM2's converted cache directory, an HF checkpoint directory made absolute), else the name."""
  if model in ("smollm2-135m", "smollm2"):
    from dora_jax.models.smollm2 import smollm2_path
    return str(smollm2_path())
  if Path(model).is_dir():
    return str(Path(model).absolute())
  return model


def plot_run(out: Path, kind: str) -> None:
  """``loss.png``: the training loss per step, and the before/after evaluation."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  recs = read_records(out / METRICS_LINES)
  steps_ = [r["step"] for r in recs if "loss" in r]
  losses = [r["loss"] for r in recs if "loss" in r]
  summary = json.loads((out / METRICS_SUMMARY).read_text())
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  axes[0].plot(steps_, losses, lw=1, alpha=0.5, label="loss")
  if len(losses) >= 10:
    w = max(len(losses) // 20, 5)
    axes[0].plot(steps_[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"), lw=2, label=f"mean of {w}")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("train loss (nats / response token)")
  axes[0].legend()
  metric = "accuracy" if kind == "label" else "perplexity"
  pts = [(0, summary["before"][metric])] + [(e["step"], e[metric]) for e in summary["evals"]]
  pts.append((summary["config"]["steps"], summary["after"][metric]))
  if len(pts) > 2:
    axes[1].plot(*zip(*pts), marker="o")
  else:  # before and after only: two markers, not a line that suggests what happened in between
    axes[1].plot(*zip(*pts), "o")
    axes[1].set_title("--eval-every N evaluates during the run", fontsize=8)
  if kind == "label" and summary.get("majority_class_rate"):
    axes[1].axhline(summary["majority_class_rate"], ls="--", c="gray", label="majority class")
    axes[1].legend()
  axes[1].set_xlabel("step")
  axes[1].set_ylabel(f"held-out {metric}")
  fig.suptitle(f"{summary['config']['method']} on {summary['config']['task']} ({summary['config']['model']})")
  fig.tight_layout()
  fig.savefig(out / "loss.png", dpi=110)
  plt.close(fig)


def _fmt(ev: Mapping[str, Any]) -> str:
  if "accuracy" in ev:
    return f"accuracy {ev['accuracy']:.1%} on {ev['eval_examples']} held-out examples"
  return f"perplexity {ev['perplexity']:.2f} (loss {ev['eval_loss']:.3f}) on {ev['eval_tokens']} tokens"
