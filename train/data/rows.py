"""Rows of fixed length (padding and packing) and the resumable, shardable batch iterator.

Part of :mod:`train.data`; see its docstring for the pipeline and the array layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from train.data.records import ARRAY_KEYS, AnyExample, Encoded, Task
from train.data.tokenize import LossOn, encode_examples, encode_task_examples, encode_texts, pad_token_id


# ----------------------------------------------------------------------------------------------
# Rows: padding and packing
# ----------------------------------------------------------------------------------------------


def _empty_rows(n: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  return {
      "input_ids": np.full((n, seq_len), pad_id, np.int32),
      "targets": np.full((n, seq_len), pad_id, np.int32),
      "loss_mask": np.zeros((n, seq_len), np.float32),
      "attention_mask": np.zeros((n, seq_len), np.int32),
      "positions": np.zeros((n, seq_len), np.int32),
      "segment_ids": np.zeros((n, seq_len), np.int32),
  }


def _put(arrays: dict, row: int, start: int, seg: int, ids: np.ndarray, mask: np.ndarray) -> None:
  n = len(ids)
  s = slice(start, start + n)
  arrays["input_ids"][row, s] = ids
  arrays["targets"][row, start:start + n - 1] = ids[1:]
  arrays["loss_mask"][row, start:start + n - 1] = mask[1:]
  arrays["attention_mask"][row, s] = 1
  arrays["positions"][row, s] = np.arange(n, dtype=np.int32)
  arrays["segment_ids"][row, s] = seg


def _check_len(encoded: Sequence[Encoded], seq_len: int) -> None:
  for i, (ids, mask) in enumerate(encoded):
    if len(ids) != len(mask):
      raise ValueError(f"Encoded example {i}: ids and mask lengths differ ({len(ids)} vs {len(mask)}).")
    if not 1 <= len(ids) <= seq_len:
      raise ValueError(f"Encoded example {i} has {len(ids)} tokens; rows hold 1..{seq_len}.")


def pad_batch(encoded: Sequence[Encoded], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """One example per row, right-padded to ``seq_len``. Returns the ARRAY_KEYS arrays, each [N, T]."""
  _check_len(encoded, seq_len)
  arrays = _empty_rows(len(encoded), seq_len, pad_id)
  for r, (ids, mask) in enumerate(encoded):
    _put(arrays, r, 0, 1, ids, mask)
  return arrays


def pack_rows(encoded: Sequence[Encoded], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Several examples per row (best fit: each goes into the open row with the least room that
  holds it, else a new row). Every example is placed whole, exactly once; segment ids count 1, 2, ...
  within a row in placement order; positions restart per segment; the last token of a segment has
  no target. Returns the ARRAY_KEYS arrays, each [R, T], R = number of rows used."""
  _check_len(encoded, seq_len)
  rows: list[list[int]] = []
  by_room: dict[int, list[int]] = {}
  count = np.zeros(seq_len + 1, np.int64)  # count[c] = open rows with exactly c free tokens
  for i, (ids, _) in enumerate(encoded):
    n = len(ids)
    fits = np.flatnonzero(count[n:])
    if fits.size:
      room = n + int(fits[0])
      r = by_room[room].pop()
      count[room] -= 1
    else:
      room, r = seq_len, len(rows)
      rows.append([])
    rows[r].append(i)
    by_room.setdefault(room - n, []).append(r)
    count[room - n] += 1
  arrays = _empty_rows(len(rows), seq_len, pad_id)
  for r, members in enumerate(rows):
    start = 0
    for seg, i in enumerate(members, start=1):
      ids, mask = encoded[i]
      _put(arrays, r, start, seg, ids, mask)
      start += len(ids)
  return arrays


def build_dataset(task_examples: Task | Sequence[AnyExample], *args, **kwargs) -> dict[str, np.ndarray]:
  """Examples -> the ARRAY_KEYS arrays [N, T=seq_len] (padded: one example per row; packed: several).

  ``build_dataset(examples, tokenizer, seq_len, packing=False, chat_template=True, system_prompt=None,
  loss_on="response")``;
  ``build_dataset(task, examples, tokenizer, seq_len, ...)`` is accepted too (the task is not needed).
  Prompt/response examples are encoded with :func:`encode_examples`, texts with :func:`encode_texts`
  (chunked to ``seq_len``). Padding uses :func:`pad_token_id`.
  """
  if isinstance(task_examples, Task):
    if not args:
      return _build_dataset(task_examples.examples, **kwargs)
    return _build_dataset(*args, **kwargs)
  return _build_dataset(task_examples, *args, **kwargs)


def _build_dataset(examples: Sequence[AnyExample], tokenizer, seq_len: int, packing: bool = False,
                   chat_template: bool = True, system_prompt: str | None = None,
                   loss_on: LossOn = "response") -> dict[str, np.ndarray]:
  encoded = encode_task_examples(tokenizer, examples, max_len=seq_len, chat_template=chat_template,
                                 system_prompt=system_prompt, loss_on=loss_on)
  pad = pad_token_id(tokenizer)
  return pack_rows(encoded, seq_len, pad) if packing else pad_batch(encoded, seq_len, pad)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


class BatchIterator:
  """Infinite, resumable, deterministic batches of rows of ``arrays`` (dict of [N, ...] numpy arrays).

  Row order: epoch ``e`` visits the rows in ``default_rng([seed, e]).permutation(N)`` order
  (``arange(N)`` with ``shuffle=False``); the same on every platform and every run.

  * ``drop_last=False`` (default): global batch ``b`` is the next ``batch_size`` rows of the stream
    of epoch orders laid end to end, so a batch may straddle two epochs: no row is ever skipped and
    every batch is full (also when N < batch_size).
  * ``drop_last=True``: every epoch yields ``N // batch_size`` batches and skips the
    ``N % batch_size`` rows its permutation puts last (other rows each epoch); needs N >= batch_size.

  Multi-process (``process_count`` P > 1, or :meth:`shard`): every process computes the same global
  batches and returns only its contiguous block: process ``p`` gets rows ``[p*B/P, (p+1)*B/P)`` of
  each global batch of ``batch_size`` B rows, as ``jax.make_array_from_process_local_data`` expects
  for a batch axis sharded over processes in process order. B must be divisible by P.

  ``state()`` is the position of the next global batch, ``{"epoch": e, "position": i}`` (rows of
  epoch e consumed), the same on every process; ``restore(state)`` continues with identical batches.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0, shuffle: bool = True,
               drop_last: bool = False, *, process_index: int = 0, process_count: int = 1):
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"Arrays have different numbers of rows: { {k: len(v) for k, v in arrays.items()} }.")
    self.num_rows = sizes.pop()
    if self.num_rows == 0:
      raise ValueError("No rows.")
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be positive and divisible by process_count={process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    if drop_last and batch_size > self.num_rows:
      raise ValueError(f"drop_last=True needs at least batch_size={batch_size} rows, got {self.num_rows}; "
                       "use drop_last=False.")
    self.arrays = dict(arrays)
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.seed = seed
    self.shuffle = shuffle
    self.drop_last = drop_last
    self.process_index = process_index
    self.process_count = process_count
    self._epoch = 0
    self._position = 0
    self._order_epoch = -1
    self._order = np.arange(self.num_rows)

  def shard(self, process_index: int, process_count: int) -> BatchIterator:
    """A new iterator over the same rows, order and state that returns process ``process_index``'s
    block of every global batch (see the class docstring)."""
    it = BatchIterator(self.arrays, self.batch_size, self.seed, self.shuffle, self.drop_last,
                       process_index=process_index, process_count=process_count)
    it.restore(self.state())
    return it

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                     if self.shuffle else np.arange(self.num_rows))
      self._order_epoch = epoch
    return self._order

  @property
  def batches_per_epoch(self) -> float:
    """Global batches per epoch (an integer with drop_last=True)."""
    if self.drop_last:
      return float(self.num_rows // self.batch_size)
    return self.num_rows / self.batch_size

  def state(self) -> dict[str, int]:
    """``{"epoch": e, "position": i}``: where the next global batch starts."""
    return {"epoch": int(self._epoch), "position": int(self._position)}

  def restore(self, state: Mapping[str, int]) -> None:
    """Continue from a :meth:`state` (of an iterator with the same rows, batch size, seed, shuffle
    and drop_last)."""
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < self.num_rows:
      raise ValueError(f"Bad iterator state {dict(state)} for {self.num_rows} rows.")
    if self.drop_last and (position % self.batch_size or position + self.batch_size > self.num_rows):
      raise ValueError(f"Bad iterator state {dict(state)}: with drop_last=True the position is a multiple of "
                       f"batch_size={self.batch_size} below {self.num_rows - self.batch_size + 1}.")
    self._epoch, self._position = epoch, position

  def next_global_indices(self) -> np.ndarray:
    """Row indices [batch_size] of the next global batch (advances the state)."""
    parts, need = [], self.batch_size
    while need:
      order = self._epoch_order(self._epoch)
      take = order[self._position:self._position + need]
      parts.append(take)
      need -= len(take)
      self._position += len(take)
      if self._position == self.num_rows or (
          self.drop_last and self._position + self.batch_size > self.num_rows):
        self._epoch, self._position = self._epoch + 1, 0
    return np.concatenate(parts)

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch: dict of [batch_size / process_count, ...]."""
    idx = self.next_global_indices()
    lo = self.process_index * self.local_batch_size
    idx = idx[lo:lo + self.local_batch_size]
    return {k: v[idx] for k, v in self.arrays.items()}
