"""``import dora_jax`` loads the library only: no model code, trainer, or optional package.

Each check runs in a fresh interpreter (this process has imported everything already).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NOT_ON_IMPORT = ("dora_jax.models", "train", "transformers", "gguf", "tokenizers", "tqdm", "jinja2",
                 "matplotlib", "torch", "orbax")
"""Modules ``import dora_jax`` must not load: optional parts (``dora_jax[models]``,
``dora_jax[train]``, ``dora_jax[peft]``), and Orbax, imported on first use (slow)."""


def loaded_after(statement: str) -> list[str]:
  """The modules of :data:`NOT_ON_IMPORT` (and their submodules) loaded by ``statement``."""
  code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  modules = json.loads(proc.stdout.strip().splitlines()[-1])
  return [m for m in modules if any(m == name or m.startswith(name + ".") for name in NOT_ON_IMPORT)]


def test_import_dora_jax_loads_no_optional_part():
  assert loaded_after("import dora_jax") == []


@pytest.mark.parametrize("statement, expected", [
    ("import dora_jax.models", "dora_jax.models.llama"),
    ("import dora_jax, train.mesh", "train.mesh"),
])
def test_the_check_sees_optional_parts(statement, expected):
  assert expected in loaded_after(statement)
