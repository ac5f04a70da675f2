"""Quantized kernels on 8 fake CPU devices; run by tests/test_quant.py in a subprocess.

Usage::

    python tests/_quant_multidevice.py    # prints one JSON object

The device count is set through ``XLA_FLAGS`` before JAX is imported (as in
``tests/_multidevice.py``).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true", "--xla_force_host_platform_device_count=8"])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax import quant
from dora_jax import sharding as sh
from dora_jax.models.llama import LOGICAL_AXIS_RULES
from train import mesh as tm
from dora_jax.tree import KernelLayout


def _codes(tree):
  """The integer (code) leaves of a quantized params tree, by path."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): v for k, v in flat if np.dtype(v.dtype).kind in "iu"}


def main() -> None:
  mesh = tm.make_mesh("fsdp=4,tensor=2")
  rng = np.random.default_rng(0)
  # Stacked [layers, I, O] like nn.scan's q_proj (6144 values a layer: 96 blocks of 64);
  # an unstacked [40, 24] kernel sharded on its input axis over tensor (15 blocks: odd).
  params = {
      "layers": {"q_proj": {"kernel": nn.Partitioned(
          rng.standard_normal((2, 64, 96)).astype(np.float32), (None, "fsdp", "tensor"))}},
      "o_proj": {"kernel": nn.Partitioned(
          rng.standard_normal((40, 24)).astype(np.float32), ("tensor", "fsdp"))},
  }
  layouts = {"layers/q_proj": KernelLayout(stack=1, inputs=1)}
  p_sh = sh.param_shardings(params, mesh, rules=LOGICAL_AXIS_RULES)
  plain = sh.shard_params(nn.unbox(params), p_sh)
  out: dict = {"devices": jax.device_count()}
  for method in ("nf4", "int8"):
    q = quant.quantize(plain, method=method, target_modules=".*", layouts=layouts, shardings=p_sh)
    expected = quant.quantized_param_shardings(q, p_sh)
    single = quant.quantize(jax.device_get(plain), method=method, target_modules=".*",
                            layouts=layouts)
    # Codes must be equal; float leaves (the mean absmax and what depends on it) may differ in
    # the last bit: a sharded mean sums in another order.
    codes_equal = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                               *(_codes(t) for t in (q, single)))
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))
                                    / np.maximum(np.abs(np.asarray(b)), 1e-30)))
    deq = jax.jit(quant.dequantize_params, out_shardings=p_sh)(q)
    out[method] = {
        "specs": tm.describe(jax.tree.map(lambda x: x.sharding, q)),
        "expected": tm.describe(expected),
        "codes_equal_to_single_device": all(jax.tree.leaves(codes_equal)),
        "max_rel_diff_to_single_device": max(jax.tree.leaves(jax.tree.map(rel, q, single))),
        "dequantized_max_rel_diff": max(jax.tree.leaves(jax.tree.map(
            rel, deq, quant.dequantize_params(single)))),
        "dequantized_specs": tm.describe(jax.tree.map(lambda x: x.sharding, deq)),
        "codes_bytes": {"total": int(q["layers"]["q_proj"]["kernel"].codes.nbytes),
                        "per_device": tm.per_device_bytes(q["layers"]["q_proj"]["kernel"].codes)},
    }
  # A per-layer slice of the sharded stacked kernel dequantizes in its own sharding.
  qk = quant.quantize_nf4(plain["layers"]["q_proj"]["kernel"], stack=1)
  kernel_sh = NamedSharding(mesh, P("fsdp", "tensor"))
  layer = jax.jit(lambda q: quant.dequantize(jax.tree.map(lambda x: x[1], q)),
                  out_shardings=kernel_sh)(qk)
  out["layer_slice_equal"] = bool(np.array_equal(
      np.asarray(layer), np.asarray(quant.dequantize(qk))[1]))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
