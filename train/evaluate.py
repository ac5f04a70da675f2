"""Held-out evaluation: label accuracy, perplexity, and (prompt/response tasks) sample
generations with an exact-match score."""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from train import steps as steps_lib


def evaluate(task, eval_set, frozen, trainable, eval_step, score_step, *, batch_size: int,
             progress: bool = False, multiple: int = 1, place=lambda b: b) -> dict[str, float]:
  """Accuracy (label tasks: the label continuation with the highest likelihood) or
  perplexity (text and generation tasks) on the held-out set.

  Every process evaluates the whole held-out set (rows replicated; ``multiple`` rounds the
  batch up so it splits over the mesh's batch axes)."""
  bs = -(-batch_size // multiple) * multiple
  from tqdm.auto import tqdm
  bar = lambda n: tqdm(range(0, n, bs), desc="evaluating", unit="batch", leave=False, file=sys.stderr,
                       disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
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


def fmt(ev: Mapping[str, Any]) -> str:
  """One line of an evaluation record."""
  if "accuracy" in ev:
    return f"accuracy {ev['accuracy']:.1%} on {ev['eval_examples']} held-out examples"
  line = f"perplexity {ev['perplexity']:.2f} (loss {ev['eval_loss']:.3f}) on {ev['eval_tokens']} tokens"
  if "exact_match" in ev:
    line += f", exact match {ev['exact_match']:.1%} on {ev['generated']} generations"
  return line


def generation_scorer(examples, model, tokenizer, lora_config, *, chat_template: bool,
                      system_prompt: str | None, n_generate: int, n_show: int, seq_len: int,
                      say: Callable[..., None]) -> Callable:
  """``score(frozen, trainable) -> {"exact_match", "generated", "samples"}`` for a prompt/response
  task: greedy, KV-cached generations (:func:`train.generate.generate_texts`) for the first
  ``n_generate`` held-out examples, formatted as in training, with the adapters applied
  unmerged (:func:`dora_jax.wrap`); ``exact_match`` (:func:`train.generate.exact_match`) against
  their responses; the first ``n_show`` are printed and kept in ``samples``. At most the
  longest reference's token count + 2 new tokens are generated (at most ``seq_len``)."""
  from train.generate import Generator, exact_match, generate_texts

  examples = list(examples)[:n_generate]
  prompts, refs = [e.prompt for e in examples], [e.response for e in examples]
  max_new = min(max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs) + 2, seq_len)

  def score(frozen, trainable) -> dict[str, Any]:
    if lora_config is None:
      gen = Generator(model, trainable, tokenizer)
    else:
      gen = Generator(model, frozen["params"], tokenizer, adapters=trainable, lora_config=lora_config,
                      base_norms=frozen.get("base_norms"))
    gen.chat_template, gen.system_prompt = chat_template, system_prompt
    texts, _ = generate_texts(gen, prompts, max_new_tokens=max_new)
    samples = [{"prompt": p, "generated": t, "reference": r}
               for p, t, r in zip(prompts[:n_show], texts, refs)]
    for smp in samples:
      say(f"  prompt: {smp['prompt']!r}\n    generated: {smp['generated']!r}\n    reference: {smp['reference']!r}")
    return {"exact_match": exact_match(texts, refs), "generated": len(texts), "samples": samples}

  return score


def make_evaluator(task, eval_set, eval_step, score_step, *, batch_size: int, progress: bool,
                   multiple: int, place, generation: Callable | None = None) -> Callable:
  """``evaluator(frozen, trainable) -> record``: :func:`evaluate`, plus, for prompt/response
  tasks, ``generation(frozen, trainable)`` (:func:`generation_scorer`)
  merged into the record."""

  def evaluator(frozen, trainable) -> dict[str, Any]:
    ev = evaluate(task, eval_set, frozen, trainable, eval_step, score_step, batch_size=batch_size,
                  progress=progress, multiple=multiple, place=place)
    if generation is not None:
      ev.update(generation(frozen, trainable))
    return ev

  return evaluator
