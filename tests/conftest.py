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
