"""Shared fixtures: the 8-fake-device run of ``tests/_multidevice.py``, once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MULTIDEVICE_SCRIPT = Path(__file__).with_name("_multidevice.py")
ROOT = MULTIDEVICE_SCRIPT.parent.parent


@pytest.fixture(scope="session")
def multidevice() -> dict:
  """The JSON ``_multidevice.py all`` prints (8 CPU devices, in a subprocess)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # it sets its own
  proc = subprocess.run([sys.executable, str(MULTIDEVICE_SCRIPT), "all"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_CACHE_CONFIG = {"jax_persistent_cache_min_compile_time_secs": 0,
                 "jax_persistent_cache_min_entry_size_bytes": -1}


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache in a fresh folder for this test session (and, through the
  environment, its subprocesses): the trainer tests build the same tiny-model programs in many
  runs (a resumed run recompiles its step), so each is compiled once. A cached executable is
  the one a compile would give, so no test can pass because of it."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  path = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  settings = {**_CACHE_CONFIG, "jax_compilation_cache_dir": path}
  saved = {name: getattr(jax.config, name) for name in settings}
  env_saved = {name.upper(): os.environ.get(name.upper()) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)
  cc.reset_cache()
  yield path
  for name, value in saved.items():
    jax.config.update(name, value)
  for name, value in env_saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  cc.reset_cache()
