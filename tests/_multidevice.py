"""Multi-device checks of dora_jax.sharding and train.mesh, run in a subprocess with fake CPU devices.

Usage::

    python tests/_multidevice.py all                 # 8 CPU devices, prints one JSON object
    python tests/_multidevice.py worker PID PORT     # one of two processes x 4 CPU devices

The device count is set through ``XLA_FLAGS`` before JAX is imported, so these checks
never affect the test process itself. ``tests/conftest.py`` runs this file once per
session; ``tests/test_sharding.py`` and ``tests/test_train_mesh.py`` assert on its JSON.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

MODE = sys.argv[1] if len(sys.argv) > 1 else "all"
os.environ["JAX_PLATFORMS"] = "cpu"
# Cheaper LLVM codegen: compile time dominates these tiny programs (numerics are unchanged
# in kind; every mesh compiles with the same flags).
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_force_host_platform_device_count=" + ("4" if MODE == "worker" else "8")])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if MODE == "worker":  # must run before any other JAX call
  from train import mesh as mesh_lib

  _PID, _PORT = int(sys.argv[2]), sys.argv[3]
  mesh_lib.initialize_distributed(f"127.0.0.1:{_PORT}", 2, _PID)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dora_jax
from dora_jax import sharding as sh
from dora_jax.models.llama import LOGICAL_AXIS_RULES, Llama, LlamaConfig
from train import mesh as mesh_lib

# No two weights share a shape (the embedding is [128, 32], down_proj [64, 32]): the HLO
# check tells kernels apart by shape.
CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
LORA = dora_jax.LoraConfig(r=4, lora_alpha=8.0, target_modules="all-linear", use_dora=True)
BATCH, SEQ = 8, 16
LOSS_MESHES = ("single", "data=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2")
HLO_MESH = "data=4,tensor=2"  # tensor parallelism only: no kernel is ever gathered
BYTES_MESHES = ("data=8", "data=4,fsdp=2", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")


def tokens(seed: int = 0, rows: int = BATCH) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (rows, SEQ)).astype(np.int32)


def make_step(model: nn.Module, tx: optax.GradientTransformation):
  """``step(params, adapters, opt_state, batch, rng) -> (adapters, opt_state, metrics)``."""
  forward = dora_jax.wrap(model.apply, LORA)

  def loss_fn(adapters, params, batch):
    ids = batch["input_ids"]
    logits = forward(params, adapters, ids)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

  def step(params, adapters, opt_state, batch, rng):
    del rng
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, batch)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, {"loss": loss}

  return step


def make_state(mesh, model: nn.Module, example, init_values=None):
  """Sharded params, adapters and optimizer state on ``mesh`` and the sharded step.

  With ``init_values=(params, adapters)`` those values are placed with
  :func:`sh.shard_params`; else they are initialized in place from seeds 0 and 1.
  """
  if init_values is None:
    params, p_sh = sh.init_sharded(model, jax.random.key(0), example, mesh=mesh, rules=LOGICAL_AXIS_RULES)
    layouts = dora_jax.kernel_layouts(model, example)
    adapters, a_sh = sh.init_adapters_sharded(jax.random.key(1), params, LORA, p_sh, mesh, layouts=layouts)
  else:
    p_sh = sh.param_shardings(sh.abstract_params(model, example), mesh, LOGICAL_AXIS_RULES)
    a_sh = sh.adapter_shardings(init_values[1], init_values[0], p_sh, mesh)
    params, adapters = sh.shard_params(init_values[0], p_sh), sh.shard_params(init_values[1], a_sh)
  tx = optax.adamw(3e-2, weight_decay=0.0)
  o_sh = sh.opt_state_shardings(tx, a_sh, adapters)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(adapters)
  rep = sh.replicated(mesh)
  step = mesh_lib.make_sharded_step(make_step(model, tx), mesh,
                                    in_shardings=(p_sh, a_sh, o_sh, mesh_lib.batch_sharding(mesh), rep),
                                    out_shardings=(a_sh, o_sh, rep), donate_argnums=(1, 2))
  return {"params": params, "p_sh": p_sh, "adapters": adapters, "a_sh": a_sh,
          "opt_state": opt_state, "o_sh": o_sh, "step": step}


def mesh_of(spec: str):
  return mesh_lib.make_mesh(None, devices=jax.devices()[:1]) if spec == "single" else mesh_lib.make_mesh(spec)


def specs_of(tree) -> dict[str, str]:
  """``{path: spec}`` of the arrays' actual shardings."""
  return mesh_lib.describe(jax.tree.map(lambda x: x.sharding, tree))


_GATHER = re.compile(r"=\s*(.+?)\s+all-gather(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of every all-gather in an HLO module's text."""
  shapes = []
  for m in _GATHER.finditer(hlo):
    for dims in _SHAPE.findall(m.group(1)):
      shapes.append(tuple(int(d) for d in dims.split(",") if d))
  return shapes


def kernel_shapes(params, layouts) -> list[tuple[int, ...]]:
  """Shapes of the adapted kernels, stacked and per layer."""
  plain = dora_jax.tree.unbox(params)
  targets = set(dora_jax.select_targets(plain, LORA, layouts=layouts))
  shapes = set()
  for path, module in dora_jax.tree.iter_modules(plain):
    if path in targets:
      shape = tuple(module["kernel"].shape)
      shapes.update({shape, shape[-2:]})
  return sorted(shapes)


def train(state, mesh, steps: int = 3) -> tuple[list[float], str]:
  """Runs ``steps`` steps; returns the losses and the compiled step's HLO text."""
  adapters, opt_state, losses = state["adapters"], state["opt_state"], []
  batches = [mesh_lib.shard_batch({"input_ids": tokens(i)}, mesh) for i in range(steps)]
  compiled = state["step"].lower(state["params"], adapters, opt_state, batches[0],
                                 jax.random.key(0)).compile()
  for i, batch in enumerate(batches):
    adapters, opt_state, metrics = compiled(state["params"], adapters, opt_state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  return losses, compiled.as_text()


def main_all() -> None:
  t0 = time.time()
  model = Llama(CONFIG, scan_layers=True)
  example = jnp.zeros((1, SEQ), jnp.int32)
  out: dict = {"devices": jax.device_count()}

  # Initialized in place on two meshes: the same values, the expected shardings.
  states = {spec: make_state(mesh_of(spec), model, example) for spec in ("single", "fsdp=4,tensor=2")}
  ref, big = states["single"], states["fsdp=4,tensor=2"]
  diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))
  # Params are bitwise equal; magnitudes (norms) may differ in the last bit (summation order).
  out["init_max_diff"] = {"params": diff(ref["params"], big["params"]),
                          "adapters": diff(ref["adapters"], big["adapters"])}
  opt_specs = specs_of(big["opt_state"])
  out["shardings"] = {
      "params": specs_of(big["params"]), "expected_params": mesh_lib.describe(big["p_sh"]),
      "adapters": specs_of(big["adapters"]),
      "opt_mu": {k.split("/mu/", 1)[1]: v for k, v in opt_specs.items() if "/mu/" in k},
      "opt_other": {k: v for k, v in opt_specs.items() if "/mu/" not in k and "/nu/" not in k},
  }
  values = (jax.device_get(ref["params"]), jax.device_get(ref["adapters"]))

  # The unrolled model's specs (no arrays needed).
  unrolled = Llama(CONFIG)
  u_abs = sh.abstract_params(unrolled, example)
  u_sh = sh.param_shardings(u_abs, big["p_sh"]["lm_head"]["kernel"].mesh, LOGICAL_AXIS_RULES)
  u_ad = jax.eval_shape(lambda p: dora_jax.init_adapters(jax.random.key(1), p, LORA), nn.unbox(u_abs))
  u_ad_sh = sh.adapter_shardings(u_ad, u_abs, u_sh, mesh_of("fsdp=4,tensor=2"))
  out["unrolled"] = {"params": mesh_lib.describe(u_sh), "adapters": mesh_lib.describe(u_ad_sh)}

  # Per-device bytes of the base on growing fsdp x tensor.
  out["bytes"] = {"total": sum(x.nbytes for x in jax.tree.leaves(values[0])), "per_device": {}}
  for spec in BYTES_MESHES:
    mesh = mesh_of(spec)
    p_sh = sh.param_shardings(sh.abstract_params(model, example), mesh, LOGICAL_AXIS_RULES)
    placed = sh.shard_params(values[0], p_sh)
    out["bytes"]["per_device"][spec] = mesh_lib.per_device_bytes(placed)

  # Loss curves; the tensor-only mesh's HLO must not gather a full kernel.
  out["losses"], out["hlo"] = {}, {}
  kernels = kernel_shapes(ref["params"], dora_jax.kernel_layouts(model, example))
  for spec in (*LOSS_MESHES, HLO_MESH):
    mesh = mesh_of(spec)
    state = states.get(spec) or make_state(mesh, model, example, init_values=values)
    out["losses"][spec], hlo = train(state, mesh)
    gathered = gathered_shapes(hlo)
    out["hlo"][spec] = {"kernels": kernels, "gathered": sorted(set(gathered)),
                        "full_kernel_gathers": sorted({g for g in gathered if g in set(kernels)}),
                        "all_reduces": len(re.findall(r" all-reduce(?:-start)?\(", hlo))}

  # Fallbacks and errors.
  tmesh = mesh_of("tensor=8")
  odd = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 12), jnp.float32), ("embed", "mlp")),
         "v": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 12), jnp.float32), ("mlp", "embed"))}
  out["fallback"] = mesh_lib.describe(sh.param_shardings(odd, tmesh, LOGICAL_AXIS_RULES))
  out["batch_slot"] = list(mesh_lib.batch_process_slot(mesh_of("data=2,fsdp=2,tensor=2")))
  try:
    mesh_lib.shard_batch({"input_ids": tokens(0, rows=6)}, mesh_of("data=8"))
    out["batch_error"] = None
  except ValueError as e:
    out["batch_error"] = str(e)
  out["seconds"] = time.time() - t0
  print(json.dumps(out))


def main_worker() -> None:
  """One of two processes: 3 DoRA steps on a (data=2, fsdp=2, tensor=2) mesh over both."""
  mesh = mesh_lib.make_mesh("data=2,fsdp=2,tensor=2")
  slot, slots = mesh_lib.batch_process_slot(mesh)
  model = Llama(CONFIG, scan_layers=True)
  state = make_state(mesh, model, jnp.zeros((1, SEQ), jnp.int32))
  adapters, opt_state, losses = state["adapters"], state["opt_state"], []
  rows = BATCH // slots
  for i in range(3):
    batch = mesh_lib.shard_batch({"input_ids": tokens(i)[slot * rows:(slot + 1) * rows]}, mesh)
    adapters, opt_state, metrics = state["step"](state["params"], adapters, opt_state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                    "slot": [slot, slots], "losses": losses}))


if __name__ == "__main__":
  {"all": main_all, "worker": main_worker}[MODE]()
