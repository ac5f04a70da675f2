"""The run directory, the unit of safety: one writer at a time, files replaced atomically.

* :class:`RunLock`: ``run.lock`` held with ``fcntl.flock`` for the life of a run; a second
  trainer on the same directory gets :class:`RunLockedError` naming the holder (pid, host,
  start time). The kernel drops the lock when its holder dies, however it dies, so a lock
  left by a killed run is taken over (and said so).
* :func:`write_atomic`: temporary file + ``fsync`` + ``os.replace`` (+ ``fsync`` of the
  directory): a reader, or a kill at any moment, sees the old content or the new, never a
  mix or an empty file.
* :class:`MetricsWriter` / :func:`read_records`: ``metrics.jsonl``, trimmed atomically when a
  run resumes, appended line by line (flushed) while it trains; a line torn by a kill is
  skipped when read back.
* :func:`replace_dir`: builds an export in a sibling folder and swaps it in, so exporting
  again (after a finished run, or one killed while exporting) replaces the old export.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Mapping

logger = logging.getLogger("train")

LOCK_NAME = "run.lock"
METRICS_LINES = "metrics.jsonl"
METRICS_SUMMARY = "metrics.json"


class RunLockedError(RuntimeError):
  """Another live process holds the run directory's lock."""


def _fsync_dir(path: Path) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomic(path: Path, text: str) -> None:
  """Replaces ``path``'s content with ``text`` so that no kill leaves a mix or a truncated file
  (call under the run lock: temporary files an earlier, killed writer left are removed)."""
  path = Path(path)
  for stale in path.parent.glob(f".{path.name}.tmp-*"):
    stale.unlink(missing_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w") as fh:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)
  _fsync_dir(path.parent)


class RunLock:
  """An exclusive lock on a run directory for one trainer process.

  The lock file holds ``{"pid", "host", "started"}`` of the holder while it runs and is
  emptied (not removed: removing it would let two processes lock two different files) when
  it is released.
  """

  def __init__(self, directory: Path):
    self.path = Path(directory) / LOCK_NAME
    self._fd: int | None = None

  def acquire(self) -> str | None:
    """Takes the lock.

    Returns:
      A sentence about a stale lock taken over (its holder died without releasing it), or
      ``None``.

    Raises:
      RunLockedError: a live process holds it (the message names pid, host and start).
    """
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # no locks on this filesystem
        os.close(fd)
        logger.warning("Cannot lock %s (%s): a second trainer on this directory would not be"
                       " detected.", self.path, e)
        return None
      holder = _describe(_read_holder(fd))
      os.close(fd)
      raise RunLockedError(
          f"{self.path.parent} is in use by another trainer ({holder}). Two writers would mix"
          " their checkpoints and metrics: wait for it to finish (or stop it), or use another"
          " --output-dir.") from None
    previous = _read_holder(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    if previous:
      return (f"took over the lock of {self.path.parent} left by {_describe(previous)}, which is"
              " no longer running (killed?)")
    return None

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> dict[str, Any] | None:
  raw = os.pread(fd, 4096, 0)
  if not raw.strip():
    return None
  try:
    return json.loads(raw)
  except ValueError:
    return {"pid": "?", "host": "?", "started": "?"}


def _describe(holder: Mapping[str, Any] | None) -> str:
  if not holder:
    return "a process that did not say which"
  return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def read_records(path: Path) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl``; a line torn by a kill (the last) is skipped."""
  path = Path(path)
  if not path.exists():
    return []
  out = []
  lines = path.read_text().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except ValueError:
      where = "its last line (torn by a kill)" if i == len(lines) - 1 else f"line {i + 1}"
      logger.warning("%s: skipping %s, which is not JSON", path, where)
  return out


class MetricsWriter:
  """``metrics.jsonl`` (one line per logged step) and optional TensorBoard.

  On opening, the file is replaced atomically by its records up to ``resume_step`` (all of
  them are dropped for a fresh run), so a kill before the first new line leaves the kept
  history intact. Lines are appended and flushed; :meth:`sync` makes them durable (called
  when a checkpoint is saved).
  """

  def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int, primary: bool = True):
    """``resume_step``: keep the records up to this step (a resumed run), else start afresh."""
    self.path = Path(out_dir) / METRICS_LINES
    self.fh = None
    if primary:
      kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
      write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      self.fh = open(self.path, "a")
    self.tb = None
    if tensorboard and primary:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as e:
        raise RuntimeError("--tensorboard needs tensorboardX: pip install tensorboardX") from e
      self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

  def write(self, record: Mapping[str, Any]) -> None:
    if self.fh is None:
      return
    self.fh.write(json.dumps(record) + "\n")
    self.fh.flush()
    if self.tb is not None and "kind" not in record:  # per-module records: not scalars of a step
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, record["step"])

  def sync(self) -> None:
    if self.fh is not None:
      os.fsync(self.fh.fileno())

  def close(self) -> None:
    if self.fh is not None:
      self.fh.close()
      self.fh = None
    if self.tb is not None:
      self.tb.close()
      self.tb = None


def _sibling(final: Path, tag: str) -> Path:
  """``.<name>.<tag>-<pid>``: the naming ``dora_jax.models.hf.save_pretrained`` uses too."""
  return final.with_name(f".{final.name}.{tag}-{os.getpid()}")


def recover_dir(final: Path) -> None:
  """Cleans what an interrupted :func:`replace_dir` of ``final`` left (call under the run lock).

  A half-built ``.<name>.tmp-*`` is removed; if ``final`` itself is missing because the kill
  came between the two renames, the previous export (``.<name>.old-*``) is put back.
  """
  final = Path(final)
  for tmp in final.parent.glob(f".{final.name}.tmp-*"):
    shutil.rmtree(tmp, ignore_errors=True)
  olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
  if olds and not final.exists():
    os.replace(olds.pop(), final)
  for old in olds:
    shutil.rmtree(old, ignore_errors=True)


def replace_dir(final: Path, build: Callable[[Path], None]) -> None:
  """Builds a folder with ``build(tmp)`` next to ``final``, then swaps it in for ``final``.

  Until the swap the old ``final`` is untouched; the swap is two renames, and
  :func:`recover_dir` repairs a kill between them.
  """
  final = Path(final)
  recover_dir(final)
  tmp = _sibling(final, "tmp")
  build(tmp)
  _fsync_dir(tmp)
  if final.exists():
    old = _sibling(final, "old")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, final)
  _fsync_dir(final.parent)


RUN_FILES = (METRICS_SUMMARY, METRICS_LINES, "loss.png", "tensorboard", "merged", "peft_adapter")
"""What a run writes in its directory besides ``checkpoints/``; ``--overwrite`` removes them."""


def remove_run_files(out: Path) -> list[str]:
  """Removes :data:`RUN_FILES` (and interrupted exports) from ``out``; returns what was removed."""
  out = Path(out)
  removed = []
  for name in RUN_FILES:
    path = out / name
    if name in ("merged", "peft_adapter"):
      recover_dir(path)
    if path.is_dir():
      shutil.rmtree(path)
      removed.append(name)
    elif path.exists():
      path.unlink()
      removed.append(name)
  return removed
