"""User data files (JSONL, JSON arrays, CSV, TXT) read into records, every malformed row named.

Part of :mod:`train.data`; see its docstring for the pipeline and the array layout.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from train.data.records import Example, LabelTask, Task, TextExample


DEFAULT_USER_TEMPLATE = "Text: {text}\nLabel ({choices}):"


def _read_text(path: Path) -> str:
  data = Path(path).read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return data.decode("cp1252", errors="replace")  # e.g. one BBC article has a latin-1 pound sign


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
    from train.data.tasks import BUNDLED_TASKS  # pylint: disable=g-import-not-at-top  (tasks reads files)

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
