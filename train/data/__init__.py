"""Data for the trainer: tasks, tokenization, padding / packing, batches, label scoring.

Everything here is numpy + a Hugging Face tokenizer (no JAX), made of small pure functions and
frozen dataclasses so that it is easy to test.

Pipeline::

  task = load_task("rotten_tomatoes")                      # Task: kind, examples, labels (TASKS: specs)
  train, held_out = split_examples(task.examples, eval_size=400, seed=0)   # or eval_size=0.1
  arrays = build_dataset(train, tok, seq_len=128, packing=False, chat_template=True)
  it = BatchIterator(arrays, batch_size=16, seed=0)         # infinite, resumable; it.shard(p, P)
  batch = next(it)                                          # dict of [B, T] numpy arrays

Records: :class:`Example` (prompt, response, label_id) for label and prompt/response tasks (a label
task's prompt is its template filled with the input text, its response the label string) and
:class:`TextExample` (text) for language modelling.

Batch arrays (every row has the same fixed length ``T`` = ``seq_len``):

  ``input_ids``      [N, T] int32    token ids; padding holds the tokenizer's pad id
  ``targets``        [N, T] int32    the next token: ``targets[t] = input_ids[t+1]`` inside a segment
  ``loss_mask``      [N, T] float32  1 where ``targets[t]`` counts in the loss
  ``attention_mask`` [N, T] int32    1 on real tokens, 0 on padding
  ``positions``      [N, T] int32    0, 1, ... restarting at every segment (0 on padding)
  ``segment_ids``    [N, T] int32    1, 2, ... per example of a packed row; 1 for the single example of
                                     a padded row; 0 on padding

A model masks attention with ``segment_ids[q] == segment_ids[k] and k <= q`` (and nonzero); targets
never cross a segment boundary (the last token of each segment has loss_mask 0).

Encoded examples are ``(ids [L] int32, token_mask [L] float32)``: ``token_mask[i] = 1`` when token
``i`` is to be *predicted*: a response token or the end-of-turn token after it (``loss_on="response"``,
the default), every token but the first (``loss_on="all"``, and always for texts). The batch arrays
shift it onto the predicting position: ``loss_mask[t] = token_mask[t+1]``.

Label (classification-as-generation) evaluation, two ways:

* general: :func:`label_choice_batch` makes one row per (example, label) with the loss mask on the
  label's tokens only; the trainer sums the masked token log-likelihoods per row, reshapes the sums to
  ``[N, K]`` and takes the argmax over labels. :func:`label_scoring_batches` yields the same rows in
  fixed-shape batches tagged with (example_index, label_index), and :func:`label_score_matrix`
  gathers the row scores back into ``[N, K]``.
* fast, when every label is one token after the prompt: :func:`label_token_ids` gives the ``[K]``
  token ids and :func:`label_prompt_batch` the prompt rows with the index of each row's last prompt
  token; the trainer compares ``logits[n, last_index[n], label_token_ids]`` (argmax over K). Both
  ways give the same decision when the labels are single tokens.
"""

from __future__ import annotations

from train.data.records import (  # noqa: F401
    ARRAY_KEYS,
    AnyExample,
    Encoded,
    Example,
    LabelTask,
    Task,
    TextExample,
)
from train.data.tasks import (  # noqa: F401
    BBC_MAX_WORDS,
    BBC_TEMPLATE,
    BUNDLED_TASKS,
    FORTUNES_DIR,
    RT_TEMPLATE,
    TASKS,
    TaskSpec,
    load_bbc_news,
    load_fortunes,
    load_hamlet,
    load_rotten_tomatoes,
    load_task,
    package_dir,
)
from train.data.files import (  # noqa: F401
    DEFAULT_USER_TEMPLATE,
    load_user_file,
)
from train.data.splits import (  # noqa: F401
    eval_count,
    majority_class_rate,
    split_examples,
)
from train.data.tokenize import (  # noqa: F401
    LossOn,
    encode_example,
    encode_examples,
    encode_task_examples,
    encode_text,
    encode_texts,
    has_chat_template,
    pad_token_id,
)
from train.data.rows import (  # noqa: F401
    BatchIterator,
    build_dataset,
    pack_rows,
    pad_batch,
)
from train.data.labels import (  # noqa: F401
    label_choice_batch,
    label_choice_rows,
    label_prompt_batch,
    label_score_matrix,
    label_scoring_batches,
    label_token_ids,
    prompt_rows,
)

__all__ = [
    "ARRAY_KEYS", "BUNDLED_TASKS", "FORTUNES_DIR",
    "Example", "TextExample", "LabelTask", "Task",
    "load_task", "load_rotten_tomatoes", "load_bbc_news", "load_hamlet", "load_fortunes",
    "load_user_file", "package_dir",
    "split_examples", "majority_class_rate",
    "has_chat_template", "pad_token_id", "encode_example", "encode_examples", "encode_text",
    "encode_texts", "encode_task_examples", "pad_batch", "pack_rows", "build_dataset",
    "BatchIterator", "label_choice_batch", "label_token_ids", "label_prompt_batch",
    "prompt_rows", "label_choice_rows", "label_scoring_batches", "label_score_matrix",
    "TaskSpec", "TASKS", "eval_count",
]
