"""The README's quickstart and the example scripts run as written."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks():
  text = (ROOT / "README.md").read_text()
  return re.findall(r"## Quickstart[^\n]*\n(?:(?!\n## ).)*?```python\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_blocks_run():
  blocks = _readme_blocks()
  assert len(blocks) >= 2, "README should show a Linen and an NNX quickstart"
  for code in blocks:
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("script", ["quickstart_linen.py", "quickstart_nnx.py"])
def test_example_scripts_run(script):
  out = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "merged == adapted: True" in out.stdout
