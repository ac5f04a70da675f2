"""Label evaluation: one row per (example, label), or one-token labels read off the prompt rows.

Part of :mod:`train.data`; see its docstring for the pipeline and the array layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from train.data.records import ARRAY_KEYS, Example, Task
from train.data.rows import _empty_rows, pad_batch
from train.data.tokenize import _assemble, _encode_parts, _truncate_prompt, pad_token_id


# ----------------------------------------------------------------------------------------------
# Label evaluation
# ----------------------------------------------------------------------------------------------


def label_choice_batch(tokenizer, prompts: Sequence[str], labels: Sequence[str], *, chat_template: bool,
                       seq_len: int, system_prompt: str | None = None) -> dict[str, np.ndarray]:
  """Rows for scoring every label after every prompt: row ``n * K + k`` is prompt n followed by
  label k (K = len(labels)), encoded as in training, padded to ``seq_len``; ``loss_mask`` covers
  only the label's own tokens (not the end-of-turn). The trainer sums ``log p(target) * loss_mask``
  per row, reshapes to [N, K] and predicts the argmax.

  Returns the ARRAY_KEYS arrays, each [N*K, T].
  """
  k = len(labels)
  parts = _encode_parts(tokenizer, [p for p in prompts for _ in range(k)], [l for _ in prompts for l in labels],
                        chat_template=chat_template, system_prompt=system_prompt)
  encoded = [_assemble(p, seq_len, i, with_end=False) for i, p in enumerate(parts)]
  return pad_batch(encoded, seq_len, pad_token_id(tokenizer))


def label_scoring_batches(examples: Sequence[Example | str], tokenizer, labels: Sequence[str], *, seq_len: int,
                          batch_size: int, chat_template: bool = True,
                          system_prompt: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches of the :func:`label_choice_batch` rows (one per example and label) of the
  examples' prompts (an :class:`Example` or the prompt string itself).

  Yields dicts of the ARRAY_KEYS arrays [B, T] (B = ``batch_size``, T = ``seq_len``) plus
  ``example_index`` [B] int32 and ``label_index`` [B] int32 naming each row's (example, label);
  the last batch is filled with padding rows (pad ids, all masks 0, both indices -1). The trainer
  computes a score per row, ``sum_t log p(targets[t]) * loss_mask[t]``, gathers the scores into
  [N, K] with :func:`label_score_matrix` and predicts ``argmax`` over K.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  prompts = [e.prompt if isinstance(e, Example) else e for e in examples]
  rows = label_choice_batch(tokenizer, prompts, labels, chat_template=chat_template, seq_len=seq_len,
                            system_prompt=system_prompt)
  k = len(labels)
  rows["example_index"] = np.repeat(np.arange(len(prompts), dtype=np.int32), k)
  rows["label_index"] = np.tile(np.arange(k, dtype=np.int32), len(prompts))
  total = len(rows["input_ids"])
  pad_id = pad_token_id(tokenizer)
  for start in range(0, total, batch_size):
    chunk = {key: v[start:start + batch_size] for key, v in rows.items()}
    missing = batch_size - len(chunk["input_ids"])
    if missing:
      filler = _empty_rows(missing, seq_len, pad_id)
      filler["example_index"] = np.full(missing, -1, np.int32)
      filler["label_index"] = np.full(missing, -1, np.int32)
      chunk = {key: np.concatenate([v, filler[key]]) for key, v in chunk.items()}
    yield chunk


def label_score_matrix(example_index: np.ndarray, label_index: np.ndarray, row_scores: np.ndarray,
                       num_examples: int, num_labels: int) -> np.ndarray:
  """Row scores [M] (with their ``example_index`` / ``label_index`` [M] from
  :func:`label_scoring_batches`, rows with index -1 ignored) -> scores [num_examples, num_labels]
  float64. Every (example, label) must be scored exactly once."""
  example_index = np.asarray(example_index).reshape(-1)
  label_index = np.asarray(label_index).reshape(-1)
  row_scores = np.asarray(row_scores, np.float64).reshape(-1)
  if not len(example_index) == len(label_index) == len(row_scores):
    raise ValueError("example_index, label_index and row_scores must have the same length.")
  keep = example_index >= 0
  e, l, v = example_index[keep], label_index[keep], row_scores[keep]
  seen = np.zeros((num_examples, num_labels), np.int64)
  np.add.at(seen, (e, l), 1)
  if not (seen == 1).all():
    raise ValueError(f"Every (example, label) must be scored once; counts range {seen.min()}..{seen.max()}.")
  out = np.empty((num_examples, num_labels), np.float64)
  out[e, l] = v
  return out


def label_token_ids(tokenizer, labels: Sequence[str], *, chat_template: bool,
                    system_prompt: str | None = None, prompt: str = "Answer:",
                    strict: bool = False) -> np.ndarray | None:
  """[K] int32: the single token each label is encoded to right after a prompt (as in training).

  When a label takes more than one token or two labels share a token, returns None (use
  :func:`label_choice_batch`), or raises ValueError with ``strict=True``.
  """
  parts = _encode_parts(tokenizer, [prompt] * len(labels), list(labels), chat_template=chat_template,
                        system_prompt=system_prompt)
  ids, problem = [], None
  for label, p in zip(labels, parts):
    if len(p.response) != 1:
      problem = f"Label {label!r} is {len(p.response)} tokens {p.response}; use label_choice_batch."
      break
    ids.append(p.response[0])
  if problem is None and len(set(ids)) != len(ids):
    problem = f"Labels {list(labels)} share tokens {ids}; use label_choice_batch."
  if problem is not None:
    if strict:
      raise ValueError(problem)
    return None
  return np.asarray(ids, np.int32)


def label_prompt_batch(tokenizer, prompts: Sequence[str], *, chat_template: bool, seq_len: int,
                       system_prompt: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The prompts alone, padded to ``seq_len`` (truncated as in training, leaving room for one label
  token), and ``last_index`` [N] int32, the position of each row's last prompt token, whose logits
  predict the label: ``pred = argmax_k logits[n, last_index[n], label_token_ids[k]]``.

  Returns (ARRAY_KEYS arrays [N, T] with loss_mask all zero, last_index [N]).
  """
  parts = _encode_parts(tokenizer, list(prompts), ["x"] * len(prompts), chat_template=chat_template,
                        system_prompt=system_prompt)
  encoded = []
  for p in parts:
    ids = np.asarray(_truncate_prompt(p, seq_len - 1), np.int32)
    encoded.append((ids, np.zeros(len(ids), np.float32)))
  arrays = pad_batch(encoded, seq_len, pad_token_id(tokenizer))
  last = np.asarray([len(ids) - 1 for ids, _ in encoded], np.int32)
  return arrays, last


# --- the same, from a Task and its examples (the trainer's calls) ----------------------------------


def prompt_rows(task: Task, examples: Sequence[Example], tokenizer, seq_len: int, *, chat_template: bool,
                system_prompt: str | None = None) -> dict[str, np.ndarray]:
  """:func:`label_prompt_batch` of the examples' prompts: ARRAY_KEYS arrays [N, T]; the last prompt
  token of row n sits at ``attention_mask[n].sum() - 1`` (rows are right-padded)."""
  del task
  arrays, _ = label_prompt_batch(tokenizer, [e.prompt for e in examples], chat_template=chat_template,
                                 seq_len=seq_len, system_prompt=system_prompt)
  return arrays


def label_choice_rows(task: Task, examples: Sequence[Example], tokenizer, seq_len: int, *, chat_template: bool,
                      system_prompt: str | None = None) -> dict[str, np.ndarray]:
  """:func:`label_choice_batch` of the examples' prompts and ``task.labels``: arrays [N*K, T], row
  ``n*K + k`` = example n with label k."""
  if task.labels is None:
    raise ValueError(f"Task {task.name!r} has no labels.")
  return label_choice_batch(tokenizer, [e.prompt for e in examples], task.labels,
                            chat_template=chat_template, seq_len=seq_len, system_prompt=system_prompt)
