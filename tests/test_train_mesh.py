"""train.mesh: mesh specs, batch placement, sharded steps, multi-process setup.

Tests on 8 fake CPU devices read the JSON of ``tests/_multidevice.py`` (the session's
``multidevice`` fixture, ``conftest.py``); the two-process test starts two workers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from dora_jax.models.llama import LOGICAL_AXIS_RULES
from train import mesh as mesh_lib

SCRIPT = Path(__file__).with_name("_multidevice.py")
ROOT = SCRIPT.parent.parent


# ---------------------------------------------------------------------------
# Mesh specs


@pytest.mark.parametrize("spec, n, expected", [
    ("data=2,fsdp=2,tensor=2", 8, (2, 2, 2)),
    (" tensor = 2 , fsdp=-1 ", 8, (1, 4, 2)),
    ("fsdp=-1", 8, (1, 8, 1)),
    ("data=-1,tensor=4", 8, (2, 1, 4)),
    ("tensor=1,data=-1", 1, (1, 1, 1)),
    (None, 8, (8, 1, 1)),
    ("", 4, (4, 1, 1)),
    ("1", 8, (8, 1, 1)),
    ({"fsdp": 2, "data": -1}, 8, (4, 2, 1)),
])
def test_parse_mesh_spec(spec, n, expected):
  sizes = mesh_lib.parse_mesh_spec(spec, n)
  assert tuple(sizes) == mesh_lib.MESH_AXES
  assert tuple(sizes.values()) == expected


@pytest.mark.parametrize("spec, match", [
    ("data=3", r"uses 3 devices but 8 exist"),
    ("data=2", r"uses 2 devices but 8 exist.*-1"),
    ("fsdp=3,tensor=-1", r"multiply to 3.*does not divide the 8 devices"),
    ("data=-1,fsdp=-1", r"Only one mesh axis may be -1"),
    ("pipeline=2", r"Unknown mesh axis 'pipeline'.*'data', 'fsdp', 'tensor'"),
    ("data=2,data=4", r"given twice"),
    ("data=0", r"positive integers or -1"),
    ("data=two", r"Cannot parse mesh spec"),
    ({"tensor": 2.5}, r"positive integers or -1"),
])
def test_parse_mesh_spec_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.parse_mesh_spec(spec, 8)


def test_make_mesh_on_this_process():
  mesh = mesh_lib.make_mesh(None)
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert mesh.shape["data"] == jax.device_count() and mesh.size == jax.device_count()
  with pytest.raises(ValueError, match=f"{jax.device_count()} exist"):
    mesh_lib.make_mesh(f"tensor={jax.device_count() + 1}")


# ---------------------------------------------------------------------------
# One process, the devices it has


def test_sharded_step_runs_under_the_rules_here():
  mesh = mesh_lib.make_mesh(None)
  seen = []

  def step(x):
    seen.append(nn.get_logical_axis_rules())
    return nn.with_logical_constraint(x * 2, ("batch", "length"))

  run = mesh_lib.make_sharded_step(step, mesh, mesh_lib.batch_sharding(mesh), mesh_lib.batch_sharding(mesh))
  n = mesh_lib.batch_size_multiple(mesh)
  x = mesh_lib.shard_batch(np.ones((2 * n, 3), np.float32), mesh)
  np.testing.assert_array_equal(np.asarray(run(x)), 2 * np.ones((2 * n, 3)))
  assert seen and tuple(seen[0]) == tuple(LOGICAL_AXIS_RULES)
  assert mesh_lib.batch_process_slot(mesh) == (0, 1)


def test_initialize_distributed_single_process(monkeypatch):
  for var in ("DORA_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "DORA_JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("DORA_JAX_NUM_PROCESSES", "1")
  assert mesh_lib.initialize_distributed() is False
  monkeypatch.setenv("DORA_JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="DORA_JAX_NUM_PROCESSES"):
    mesh_lib.initialize_distributed()
  monkeypatch.delenv("DORA_JAX_NUM_PROCESSES")
  assert mesh_lib.initialize_distributed() is False  # no cluster here: a no-op
  assert not jax.distributed.is_initialized()


# ---------------------------------------------------------------------------
# 8 fake CPU devices (subprocess)


@pytest.mark.multidevice
def test_batch_helpers_on_8_devices(multidevice):
  assert multidevice["batch_slot"] == [0, 1]
  assert "multiple of 8" in multidevice["batch_error"]
  assert multidevice["fallback"] == {"v": "P('tensor', 'fsdp')", "w": "P('fsdp', None)"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_like_one(multidevice):
  """2 processes x 4 CPU devices (jax.distributed, gloo) on a data=2,fsdp=2,tensor=2 mesh."""
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), "worker", str(i), port], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-4000:]
      outs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [o["process"] for o in outs] == [0, 1]
  assert all(o["processes"] == 2 and o["devices"] == 8 and o["local_devices"] == 4 for o in outs)
  assert [o["slot"] for o in outs] == [[0, 2], [1, 2]]
  np.testing.assert_allclose(outs[0]["losses"], outs[1]["losses"], rtol=0)
  np.testing.assert_allclose(outs[0]["losses"], multidevice["losses"]["single"], rtol=1e-5)
