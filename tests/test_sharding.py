"""dora_jax.sharding: mesh specs, param / adapter / optimizer / batch shardings, sharded training.

Spec-level tests run here on an ``AbstractMesh`` (no devices needed). Tests on real
meshes of 8 fake CPU devices run ``tests/_multidevice.py`` in a subprocess (the device
count must be set before JAX starts), once per session, and check its JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import dora_jax
from dora_jax import sharding as sh
from dora_jax.models.llama import Llama, LlamaConfig
from dora_jax.tree import KernelLayout

SCRIPT = Path(__file__).with_name("_multidevice.py")
ROOT = SCRIPT.parent.parent
CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
LORA = dora_jax.LoraConfig(r=4, target_modules="all-linear", use_dora=True)


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
  sizes = sh.parse_mesh_spec(spec, n)
  assert tuple(sizes) == sh.MESH_AXES
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
    sh.parse_mesh_spec(spec, 8)


def test_make_mesh_on_this_process():
  mesh = sh.make_mesh(None)
  assert mesh.axis_names == sh.MESH_AXES
  assert mesh.shape["data"] == jax.device_count() and mesh.size == jax.device_count()
  with pytest.raises(ValueError, match=f"{jax.device_count()} exist"):
    sh.make_mesh(f"tensor={jax.device_count() + 1}")


# ---------------------------------------------------------------------------
# Specs on an abstract mesh (data=1, fsdp=4, tensor=2)


def abstract_mesh(data=1, fsdp=4, tensor=2) -> AbstractMesh:
  return AbstractMesh((data, fsdp, tensor), sh.MESH_AXES)


@pytest.mark.parametrize("spec, shape, expected", [
    (("fsdp", "tensor"), (8, 6), P("fsdp", "tensor")),
    (("fsdp", "tensor"), (6, 6), P(None, "tensor")),       # 6 % 4: unsharded
    ((("data", "fsdp"),), (4, 3), P(("data", "fsdp"), None)),
    ((("fsdp", "tensor"),), (12,), P("fsdp")),            # longest dividing prefix of (fsdp, tensor)
    ((("tensor", "fsdp"),), (6,), P("tensor")),
    (("expert",), (8,), P(None)),                          # not a mesh axis
    ((), (3, 3), P(None, None)),
])
def test_fit_spec(spec, shape, expected):
  assert sh.fit_spec(spec, shape, abstract_mesh()) == expected


@pytest.mark.parametrize("kernel_spec, layout, a, b, m", [
    (("fsdp", "tensor"), KernelLayout(0, 1), P("fsdp", None), P(None, "tensor"), P("tensor")),
    ((None, "tensor", "fsdp"), KernelLayout(1, 1), P(None, "tensor", None), P(None, None, "fsdp"),
     P(None, "fsdp")),
    # [heads, head_dim, embed] -> I = heads*head_dim: the leading axis's shards stay contiguous.
    (("tensor", None, "fsdp"), KernelLayout(0, 2), P("tensor", None), P(None, "fsdp"), P("fsdp")),
    # ... a later input axis does not: replicated.
    ((None, "tensor", "fsdp"), KernelLayout(0, 2), P(None, None), P(None, "fsdp"), P("fsdp")),
    # [embed, heads, head_dim] -> O = heads*head_dim.
    (("fsdp", "tensor", None), KernelLayout(0, 1), P("fsdp", None), P(None, "tensor"), P("tensor")),
    (("fsdp", None, "tensor"), KernelLayout(0, 1), P("fsdp", None), P(None, None), P(None)),
])
def test_adapter_specs(kernel_spec, layout, a, b, m):
  assert sh.adapter_specs(kernel_spec, layout) == {"lora_a": a, "lora_b": b, "magnitude": m}


def llama_trees(scan: bool):
  model = Llama(CONFIG, scan_layers=scan)
  example = jnp.zeros((1, 8), jnp.int32)
  boxed = sh.abstract_params(model, example)
  layouts = dora_jax.kernel_layouts(model, example)
  adapters = jax.eval_shape(lambda p: dora_jax.init_adapters(jax.random.key(0), p, LORA, layouts=layouts),
                            nn.unbox(boxed))
  return boxed, adapters


@pytest.mark.parametrize("scan", [False, True])
def test_param_and_adapter_specs_follow_the_rules(scan):
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(scan)
  p_specs = sh.describe(sh.param_shardings(boxed, mesh))
  a_specs = sh.describe(sh.adapter_shardings(adapters, boxed, sh.param_shardings(boxed, mesh), mesh))
  layer = "model/layers" if scan else "model/layers_1"
  st = (None,) if scan else ()
  expect_p = {
      "model/embed_tokens/embedding": P("tensor", "fsdp"),   # (vocab, embed)
      "lm_head/kernel": P("fsdp", "tensor"),                 # (embed, vocab)
      "model/norm/scale": P(None),
      f"{layer}/input_layernorm/scale": P(*st, None),
      f"{layer}/self_attn/q_proj/kernel": P(*st, "fsdp", "tensor"),
      f"{layer}/self_attn/k_proj/kernel": P(*st, "fsdp", "tensor"),
      f"{layer}/self_attn/o_proj/kernel": P(*st, "tensor", "fsdp"),
      f"{layer}/mlp/up_proj/kernel": P(*st, "fsdp", "tensor"),
      f"{layer}/mlp/down_proj/kernel": P(*st, "tensor", "fsdp"),
  }
  for path, spec in expect_p.items():
    assert p_specs[path] == str(spec), path
  for name, (i, o) in {"q_proj": ("fsdp", "tensor"), "o_proj": ("tensor", "fsdp"),
                       "v_proj": ("fsdp", "tensor")}.items():
    base = f"{layer}/self_attn/{name}"
    assert a_specs[f"{base}/lora_a"] == str(P(*st, i, None))
    assert a_specs[f"{base}/lora_b"] == str(P(*st, None, o))
    assert a_specs[f"{base}/magnitude"] == str(P(*st, o))
  assert a_specs[f"{layer}/mlp/down_proj/lora_a"] == str(P(*st, "tensor", None))
  replicated = sh.adapter_shardings(adapters, boxed, sh.param_shardings(boxed, mesh), mesh, replicate=True)
  assert set(sh.describe(replicated).values()) == {"P()"}


def test_indivisible_axes_fall_back_to_replicated(caplog):
  mesh = abstract_mesh(data=1, fsdp=1, tensor=8)
  tree = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 12), jnp.float32), ("embed", "mlp")),
          "v": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 12), jnp.float32), ("mlp", "embed")),
          "plain": jax.ShapeDtypeStruct((16,), jnp.float32)}
  with caplog.at_level("WARNING", logger="dora_jax"):
    specs = sh.describe(sh.param_shardings(tree, mesh))
  assert specs == {"w": "P('fsdp', None)", "v": "P('tensor', 'fsdp')", "plain": "P()"}
  assert "not divisible" in caplog.text


def test_adapter_shardings_need_the_kernel_sharding():
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(False)
  with pytest.raises(ValueError, match="no sharding for the kernel"):
    sh.adapter_shardings(adapters, boxed, {}, mesh)


@pytest.mark.parametrize("make_tx", [
    lambda: optax.adamw(1e-3, mask=dora_jax.weight_decay_mask),
    lambda: optax.chain(optax.clip_by_global_norm(1.0),
                        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)),
])
def test_opt_state_shardings_mirror_the_adapters(make_tx):
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(True)
  a_sh = sh.adapter_shardings(adapters, boxed, sh.param_shardings(boxed, mesh), mesh)
  o_specs = sh.describe(sh.opt_state_shardings(make_tx(), a_sh, adapters))
  a_specs = sh.describe(a_sh)
  moments = {k: v for k, v in o_specs.items() if "/mu/" in k or "/nu/" in k}
  assert len(moments) == 2 * len(a_specs)
  for key, spec in moments.items():
    assert spec == a_specs[key.split("/mu/" if "/mu/" in key else "/nu/", 1)[1]], key
  assert all(v == "P()" for k, v in o_specs.items() if k not in moments)


def test_opt_state_shardings_through_freeze_base():
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(False)
  p_sh = sh.param_shardings(boxed, mesh)
  a_sh = sh.adapter_shardings(adapters, boxed, p_sh, mesh)
  combined = dora_jax.combine(nn.unbox(boxed), adapters)
  o_specs = sh.describe(sh.opt_state_shardings(dora_jax.freeze_base(optax.adam(1e-3)),
                                               dora_jax.combine(p_sh, a_sh), combined))
  key = "inner_states/adapter/inner_state/0/mu/model/layers_0/self_attn/o_proj/lora_a"
  assert o_specs[key] == "P('tensor', None)"
  assert not any("kernel" in k for k in o_specs)  # the frozen base has no optimizer state


# ---------------------------------------------------------------------------
# One process, the devices it has


def test_sharded_step_runs_under_the_rules_here():
  mesh = sh.make_mesh(None)
  seen = []

  def step(x):
    seen.append(nn.get_logical_axis_rules())
    return nn.with_logical_constraint(x * 2, ("batch", "length"))

  run = sh.make_sharded_step(step, mesh, sh.batch_sharding(mesh), sh.batch_sharding(mesh))
  n = sh.batch_size_multiple(mesh)
  x = sh.shard_batch(np.ones((2 * n, 3), np.float32), mesh)
  np.testing.assert_array_equal(np.asarray(run(x)), 2 * np.ones((2 * n, 3)))
  assert seen and tuple(seen[0]) == tuple(sh.LOGICAL_AXIS_RULES)
  assert sh.batch_process_slot(mesh) == (0, 1)


def test_path_sharding_fn():
  mesh = sh.make_mesh(None)
  s = sh.replicated(mesh)
  fn = sh.path_sharding_fn({"model": {"norm": {"scale": s}}})
  assert fn(("model", "norm", "scale"), (4,), np.float32) is s
  assert fn(("model", "other"), (4,), np.float32) is None


def test_initialize_distributed_single_process(monkeypatch):
  for var in ("DORA_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "DORA_JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("DORA_JAX_NUM_PROCESSES", "1")
  assert sh.initialize_distributed() is False
  monkeypatch.setenv("DORA_JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="DORA_JAX_NUM_PROCESSES"):
    sh.initialize_distributed()
  monkeypatch.delenv("DORA_JAX_NUM_PROCESSES")
  assert sh.initialize_distributed() is False  # no cluster here: a no-op
  assert not jax.distributed.is_initialized()


# ---------------------------------------------------------------------------
# 8 fake CPU devices (subprocess)


def _run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def multidevice() -> dict:
  proc = _run_script("all")
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.multidevice
def test_arrays_have_the_derived_shardings(multidevice):
  s = multidevice["shardings"]
  assert multidevice["devices"] == 8
  assert s["params"] == s["expected_params"]
  assert s["params"]["model/layers/self_attn/q_proj/kernel"] == "P(None, 'fsdp', 'tensor')"
  assert s["params"]["model/layers/mlp/down_proj/kernel"] == "P(None, 'tensor', 'fsdp')"
  ad = s["adapters"]
  assert ad["model/layers/self_attn/q_proj/lora_a"] == "P(None, 'fsdp', None)"
  assert ad["model/layers/self_attn/q_proj/lora_b"] == "P(None, None, 'tensor')"
  assert ad["model/layers/self_attn/q_proj/magnitude"] == "P(None, 'tensor')"
  assert ad["model/layers/mlp/down_proj/lora_a"] == "P(None, 'tensor', None)"
  assert ad["model/layers/mlp/down_proj/magnitude"] == "P(None, 'fsdp')"
  assert s["opt_mu"] == ad
  assert set(s["opt_other"].values()) == {"P()"}
  u = multidevice["unrolled"]
  assert u["params"]["model/layers_0/self_attn/o_proj/kernel"] == "P('tensor', 'fsdp')"
  assert u["adapters"]["model/layers_0/self_attn/o_proj/lora_b"] == "P(None, 'fsdp')"


@pytest.mark.multidevice
def test_sharded_init_matches_single_device(multidevice):
  assert multidevice["init_max_diff"]["params"] == 0.0
  assert multidevice["init_max_diff"]["adapters"] < 1e-6  # norms: summation order


@pytest.mark.multidevice
def test_per_device_base_bytes_shrink_with_fsdp_and_tensor(multidevice):
  b = multidevice["bytes"]
  per = [b["per_device"][k] for k in ("data=8", "data=4,fsdp=2", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")]
  assert per[0] == b["total"]
  assert all(x > y for x, y in itertools.pairwise(per)), per
  assert per[-1] < b["total"] / 6  # 8-way, except the (replicated) norm scales


@pytest.mark.multidevice
def test_same_loss_curve_on_every_mesh(multidevice):
  losses = multidevice["losses"]
  ref = np.array(losses["single"])
  assert abs(ref[-1] - ref[0]) > 1e-4  # the adapters do train
  for spec, curve in losses.items():
    np.testing.assert_allclose(curve, ref, rtol=1e-5, err_msg=spec)


@pytest.mark.multidevice
def test_tensor_parallel_dora_step_gathers_no_kernel(multidevice):
  hlo = multidevice["hlo"]
  assert hlo["data=4,tensor=2"]["full_kernel_gathers"] == []
  assert hlo["data=4,tensor=2"]["all_reduces"] > 0  # the partial sums of o/down_proj
  # The detector works: FSDP gathers kernel shards before the matmuls, as expected.
  assert hlo["fsdp=4,tensor=2"]["full_kernel_gathers"]


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
