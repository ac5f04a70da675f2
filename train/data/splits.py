"""Train / held-out splits over distinct examples, and the majority-class rate.

Part of :mod:`train.data`; see its docstring for the pipeline and the array layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from train.data.records import AnyExample, Example


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def eval_count(eval_size: int | float, n: int) -> int:
  """The number of eval examples: ``eval_size`` itself (an int), or ``round(eval_size * n)`` for a
  float fraction in (0, 1) (halves round up). Must leave at least one training example."""
  if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float, np.integer, np.floating)):
    raise TypeError(f"eval_size must be an int or a float fraction, got {eval_size!r}.")
  if isinstance(eval_size, (float, np.floating)):
    if not 0.0 < eval_size < 1.0:
      raise ValueError(f"A fractional eval_size must be in (0, 1), got {eval_size}.")
    k = int(np.floor(eval_size * n + 0.5))
  else:
    k = int(eval_size)
  if not 0 <= k < n:
    raise ValueError(f"eval_size={eval_size} gives {k} eval examples; it must be in [0, {n}) for {n} examples.")
  return k


def split_examples(examples: Sequence[AnyExample], eval_size: int | float, seed: int = 0
                   ) -> tuple[tuple[AnyExample, ...], tuple[AnyExample, ...]]:
  """Deterministic disjoint (train, eval) split, both in a seeded random order.

  ``eval_size``: a count (int) or a fraction of the examples (float in (0, 1)), see :func:`eval_count`.
  The split is drawn over the *distinct* examples (equal records count once), so that nothing in
  eval is also in train: eval holds ``eval_size`` distinct examples, train every copy of the others
  (copies of an eval example are left out; BBC News has 118 repeated records at 45 words, Rotten
  Tomatoes 56). Label examples are stratified: label c gets ``eval_size * d_c / D`` eval examples
  (d_c of the D distinct examples have label c; rounded by largest remainder, ties to the smaller
  label id, so the total is exactly ``eval_size``). All randomness is
  ``numpy.random.default_rng(seed).permutation`` (the same on every platform). Train comes shuffled,
  so ``train[:n]`` is a random subset.
  """
  n = len(examples)
  eval_size = eval_count(eval_size, n)
  group_of_key: dict[AnyExample, int] = {}
  group = np.asarray([group_of_key.setdefault(e, len(group_of_key)) for e in examples], np.int64)
  reps = np.unique(group, return_index=True)[1]  # reps[g] = index of the first example of group g
  d = len(reps)
  if eval_size >= d:
    raise ValueError(f"eval_size={eval_size} leaves no training example: there are {d} distinct examples.")
  rng = np.random.default_rng(seed)
  label_ids = [getattr(examples[i], "label_id", None) for i in reps]
  if d and all(lab is not None for lab in label_ids):
    y = np.asarray(label_ids)
    classes, counts = np.unique(y, return_counts=True)
    quota = eval_size * counts / d
    take = np.floor(quota).astype(int)
    rest = eval_size - int(take.sum())
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:rest]] += 1
    eval_groups = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)])
    eval_groups = eval_groups[rng.permutation(len(eval_groups))]
  else:
    eval_groups = rng.permutation(d)[:eval_size]
  in_eval = np.zeros(d, bool)
  in_eval[eval_groups] = True
  train_idx = np.flatnonzero(~in_eval[group])
  train_idx = train_idx[rng.permutation(len(train_idx))]
  return tuple(examples[i] for i in train_idx), tuple(examples[i] for i in reps[eval_groups])


def majority_class_rate(examples_or_label_ids: Sequence[Example] | Sequence[int] | np.ndarray) -> float:
  """Accuracy of always predicting the most frequent label: ``max(bincount) / N``.

  Takes label examples (their ``label_id``) or the label ids [N] themselves."""
  items = list(examples_or_label_ids)
  if items and isinstance(items[0], Example):
    if any(e.label_id is None for e in items):
      raise ValueError("majority_class_rate needs label examples (label_id set).")
    items = [e.label_id for e in items]
  y = np.asarray(items, np.int64)
  if y.size == 0:
    raise ValueError("No labels.")
  return float(np.bincount(y).max() / y.size)
