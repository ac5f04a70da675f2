"""Records (Example, TextExample), label and data tasks (LabelTask, Task), and the batch array keys.

Part of :mod:`train.data`; see its docstring for the pipeline and the array layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np


ARRAY_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask", "positions", "segment_ids")

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
