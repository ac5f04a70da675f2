"""dora_jax.quant: NF4 (double quantization) and int8 kernels against bitsandbytes and numpy.

The numpy reference below is written from the QLoRA paper and bitsandbytes' reference
backend (``backends/default/ops.py``), independently of the JAX implementation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax import quant
from dora_jax.tree import KernelLayout

# QLoRA's NF4 values as DESIGN.md lists them (7 digits).
NF4_DESIGN = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
              0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
H4 = float(np.max(np.diff(quant.NF4_CODE))) / 2  # largest half-gap of the NF4 table
H8 = float(np.max(np.diff(quant.DYNAMIC_CODE))) / 2  # of the 8-bit dynamic table


# ---------------------------------------------------------------------------
# Independent numpy reference


def _nearest(x, midpoints):
  return np.searchsorted(midpoints, x, side="left")  # number of midpoints < x: ties go low


def _blockwise(x, table, bs):
  """bitsandbytes' reference blockwise quantizer of a 1-D float32 array: (codes, absmax)."""
  n = x.size
  x = np.concatenate([x, np.zeros(-n % bs, np.float32)]).reshape(-1, bs)
  absmax = np.abs(x).max(axis=1)
  inv = np.float32(1) / np.where(absmax > 0, absmax, np.float32(1))
  scaled = np.clip(x * np.where(absmax > 0, inv, 0)[:, None], -1, 1)
  mid = (table[:-1] + table[1:]) / np.float32(2)
  return _nearest(scaled, mid).reshape(-1)[:n], absmax


def np_nf4(w, bs=64, dq=True, bs2=256):
  """(packed codes, dequantized absmax, dequantized values, true absmax) of one layer."""
  x = np.asarray(w, np.float32).reshape(-1)
  n = x.size
  q, absmax = _blockwise(x, quant.NF4_CODE, bs)
  q = np.concatenate([q, np.full(-n % bs, 7)]).astype(np.uint8)
  packed = (q[0::2] << 4) | q[1::2]
  a = absmax
  if dq:
    offset = np.float32(absmax.astype(np.float64).mean())
    q2, scale2 = _blockwise(absmax - offset, quant.DYNAMIC_CODE, bs2)
    a = (quant.DYNAMIC_CODE[q2] * np.repeat(scale2, bs2)[: absmax.size]) + offset
  values = (quant.NF4_CODE[q].reshape(-1, bs) * a[:, None]).reshape(-1)[:n]
  return packed, a, values.reshape(np.shape(w)), absmax


def _normal(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------
# Tables


def test_tables():
  np.testing.assert_allclose(quant.NF4_CODE, NF4_DESIGN, rtol=0, atol=6e-8)
  d = quant.DYNAMIC_CODE
  assert d.shape == (256,) and d.dtype == np.float32 and np.all(np.diff(d) > 0)
  assert d[255] == 1.0 and d[127] == 0.0 and np.array_equal(d[:127], -d[128:255][::-1])
  # create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) in float64.
  pos = []
  for i in range(7):
    b = np.linspace(0.1, 1, 2 ** i + 1)
    pos += list(10.0 ** (i - 6) * (b[:-1] + b[1:]) / 2)
  np.testing.assert_allclose(d[128:255], np.sort(pos), rtol=2e-7)


def test_tables_equal_bitsandbytes():
  F = pytest.importorskip("bitsandbytes.functional")
  np.testing.assert_array_equal(quant.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
  # Built with float32 torch.linspace: equal here (x86-64); other CPUs may differ in a last bit.
  np.testing.assert_array_max_ulp(quant.DYNAMIC_CODE, F.create_dynamic_map().numpy(), maxulp=1)


# ---------------------------------------------------------------------------
# NF4 against bitsandbytes and numpy


def _bnb_reference_blockwise(x, code, bs):
  """bitsandbytes' reference (CompositeExplicitAutograd) quantize_blockwise, not its CPU LUT."""
  import torch

  op = torch.ops.bitsandbytes.quantize_blockwise.default
  keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
  return op.redispatch(keys, x, code, bs)


@pytest.mark.parametrize("shape", [(96, 200), (37, 20)])
@pytest.mark.parametrize("dq", [False, True])
def test_nf4_matches_bitsandbytes(shape, dq):
  torch = pytest.importorskip("torch")
  F = pytest.importorskip("bitsandbytes.functional")
  w = _normal(shape, seed=1)
  qk = quant.quantize_nf4(jnp.asarray(w), double_quant=dq)
  packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=dq,
                                  quant_type="nf4")
  packed = packed.numpy().reshape(-1)
  codes = np.asarray(qk.codes)
  np.testing.assert_array_equal(codes[: packed.size], packed)  # bit for bit
  assert np.all(codes[packed.size:] == 0x77)  # zero padding: code 7 (0.0) in both nibbles
  nb = state.absmax.numel()
  if dq:
    assert float(qk.absmax_offset) == pytest.approx(float(state.offset), rel=1e-6)
    np.testing.assert_allclose(qk.absmax_scale, state.state2.absmax.numpy(), rtol=1e-6)
    # bitsandbytes' CPU kernel picks 8-bit codes from a 2^16-entry table: its reference
    # backend gives the exact nearest code, which must equal ours.
    _, raw = F.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=False,
                             quant_type="nf4")
    offset = raw.absmax.mean()
    ref_codes, _ = _bnb_reference_blockwise(raw.absmax - offset, state.state2.code, 256)
    np.testing.assert_array_equal(np.asarray(qk.absmax_codes)[:nb], ref_codes.numpy())
    lut = state.absmax.numpy().astype(int)
    assert np.max(np.abs(lut - ref_codes.numpy())) <= 1
    state.absmax = ref_codes
  else:
    np.testing.assert_array_equal(qk.absmax, state.absmax.numpy())
  expected = F.dequantize_4bit(torch.from_numpy(packed[:, None].copy()), state).numpy()
  np.testing.assert_allclose(quant.dequantize(qk), expected, rtol=1e-6, atol=1e-6)
  assert quant.nf4_absmax(qk).shape == (nb,)


@pytest.mark.parametrize("shape, dtype, dq", [
    ((48, 80), jnp.float32, True), ((48, 80), jnp.bfloat16, False), ((5, 30), jnp.float32, True),
])
def test_nf4_matches_numpy_reference(shape, dtype, dq):
  w = jnp.asarray(_normal(shape, seed=2), dtype)
  qk = quant.quantize_nf4(w, double_quant=dq)
  packed, a, values, _ = np_nf4(np.asarray(w.astype(jnp.float32)), dq=dq)
  np.testing.assert_array_equal(qk.codes, packed)
  np.testing.assert_allclose(quant.nf4_absmax(qk), a, rtol=1e-6)
  out = quant.dequantize(qk)
  assert out.shape == shape and out.dtype == dtype
  np.testing.assert_allclose(out.astype(jnp.float32), values.astype(np.dtype(dtype)).astype(np.float32),
                             rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6, atol=1e-6)
  assert quant.dequantize(qk, jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_round_trip_error_bound_per_block(dq):
  w = _normal((128, 96), seed=3, scale=0.05)
  w[5, :] *= 40.0  # an outlier row: its blocks get a large absmax
  qk = quant.quantize_nf4(jnp.asarray(w), double_quant=dq)
  err = np.abs(np.asarray(quant.dequantize(qk)) - w).reshape(-1, 64)
  absmax = np.abs(w).reshape(-1, 64).max(axis=1)
  # |w - c·a'| <= |w - c·a| + |c|·|a - a'| <= a·H4 + |a - a'|, and with double quantization
  # |a - a'| <= (absmax of a - mean(a) over its block of 256) · H8.
  dq_err = 0.0
  if dq:
    centered = absmax - absmax.mean()
    dq_err = np.abs(np.concatenate([centered, np.zeros(-centered.size % 256)])).reshape(-1, 256)
    dq_err = np.repeat(dq_err.max(axis=1), 256)[: absmax.size] * H8
    assert np.all(np.abs(np.asarray(quant.nf4_absmax(qk)) - absmax) <= dq_err * (1 + 1e-5) + 1e-6)
  bound = absmax * H4 + dq_err
  assert np.all(err.max(axis=1) <= bound * (1 + 1e-5) + 1e-7)
  assert err.max() > 0.5 * H4 * absmax.min()  # the bound is not vacuous


def test_nf4_nibble_order_and_codes():
  w = np.zeros(64, np.float32)
  w[:6] = [-2.0, 2.0, 0.0, 0.16093020141124725 * 2, -0.09105003625154495 * 2, 0.03]
  qk = quant.quantize_nf4(jnp.asarray(w), double_quant=False)
  codes = np.asarray(qk.codes)
  assert codes.shape == (32,) and codes.dtype == np.uint8
  # (-1 -> 0, 1 -> 15), (0 -> 7, 0.1609 -> 9), (-0.0911 -> 6, 0.015 -> 7: below the 0.0398 midpoint)
  assert list(codes[:3]) == [0x0F, 0x79, 0x67]
  assert float(qk.absmax[0]) == 2.0
  # Dequantizing hand-packed bytes: the high nibble is the first value.
  hand = qk.replace(codes=jnp.asarray(np.array([0xF0] + [0x77] * 31, np.uint8)))
  np.testing.assert_array_equal(quant.dequantize(hand)[:3], [2.0, -2.0, 0.0])


def test_nf4_midpoint_ties_go_to_the_lower_code():
  mid = np.float32((quant.NF4_CODE[12] + quant.NF4_CODE[13]) / np.float32(2))
  w = np.zeros(64, np.float32)
  w[:3] = [1.0, mid, np.nextafter(mid, np.float32(1))]
  q = np.asarray(quant.quantize_nf4(jnp.asarray(w), double_quant=False).codes)
  assert q[0] >> 4 == 15 and q[0] & 0xF == 12 and q[1] >> 4 == 13


def test_nf4_padding_and_zero_blocks():
  w = _normal((7, 9), seed=4)  # 63 values: one partial block
  qk = quant.quantize_nf4(jnp.asarray(w))
  assert qk.codes.shape == (32,) and qk.layer_shape == (7, 9) and qk.shape == (7, 9)
  np.testing.assert_allclose(quant.dequantize(qk), np_nf4(w)[2], rtol=1e-6, atol=1e-6)
  z = quant.quantize_nf4(jnp.zeros((4, 64), jnp.bfloat16))  # every absmax 0: no NaN
  assert np.all(np.asarray(z.codes) == 0x77)
  np.testing.assert_array_equal(quant.dequantize(z), np.zeros((4, 64)))
  c = quant.quantize_nf4(jnp.ones((4, 64)))  # absmax all equal to their mean
  np.testing.assert_array_equal(quant.dequantize(c), np.ones((4, 64)))


def test_bits_per_param():
  shape = (576, 1536)
  n = shape[0] * shape[1]
  w = jnp.asarray(_normal(shape, seed=5, scale=0.02))
  nb = n // 64
  expected = (n * 4 + nb * 8 + -(-nb // 256) * 32 + 32) / n
  dq = quant.quantize_nf4(w)
  assert quant.bits_per_param(dq) == pytest.approx(expected) and abs(expected - 4.127) < 0.001
  assert quant.bits_per_param(quant.quantize_nf4(w, double_quant=False)) == 4.5
  assert quant.bits_per_param(quant.quantize_int8(w)) == pytest.approx(8 + 32 / 576)
  assert quant.bits_per_param(jax.eval_shape(quant.quantize_nf4, w)) == pytest.approx(expected)


# ---------------------------------------------------------------------------
# Stacked kernels


def test_stacked_kernels_slice_into_layers():
  w = jnp.asarray(_normal((3, 40, 24), seed=6))
  for qk, one in [(quant.quantize_nf4(w, stack=1), lambda x: quant.quantize_nf4(x)),
                  (quant.quantize_int8(w, stack=1, block_size=16),
                   lambda x: quant.quantize_int8(x, block_size=16))]:
    assert qk.shape == (3, 40, 24) and qk.stack_shape == (3,)
    assert all(x.shape[0] == 3 for x in jax.tree.leaves(qk))
    full = np.asarray(quant.dequantize(qk))
    for i in range(3):
      layer = jax.tree.map(lambda x: x[i], qk)
      assert layer.stack_shape == () and layer.shape == (40, 24)
      jax.tree.map(np.testing.assert_array_equal, layer, one(w[i]))
      np.testing.assert_array_equal(quant.dequantize(layer), full[i])
    # As nn.scan does: the scanned body gets one layer's slice of every leaf.
    _, scanned = jax.lax.scan(lambda c, q: (c, quant.dequantize(q)), 0, qk)
    np.testing.assert_array_equal(scanned, full)


# ---------------------------------------------------------------------------
# int8


def test_int8_matches_bitsandbytes_and_round_trip():
  w = _normal((40, 24), seed=7)
  qk = quant.quantize_int8(jnp.asarray(w))
  codes, absmax = np.asarray(qk.codes), np.asarray(qk.absmax)
  assert codes.dtype == np.int8 and absmax.shape == (1, 24)
  # Numpy: round half to even of w·(127/absmax) per output channel (column).
  col = np.abs(w).max(axis=0)
  np.testing.assert_array_equal(codes, np.round(w * (np.float32(127) / col)))
  np.testing.assert_array_equal(absmax[0], col)
  deq = np.asarray(quant.dequantize(qk))
  assert np.all(np.abs(deq - w) <= col / 127 / 2 * (1 + 1e-5))
  torch = pytest.importorskip("torch")
  F = pytest.importorskip("bitsandbytes.functional")
  cb, stats, _ = F.int8_vectorwise_quant(torch.from_numpy(w.T.copy()))
  np.testing.assert_array_equal(codes, cb.numpy().T)
  np.testing.assert_array_equal(absmax[0], stats.numpy())
  np.testing.assert_array_equal(deq, F.int8_vectorwise_dequant(cb, stats).numpy().T)


def test_int8_blocks_and_multi_axis_layout():
  w = _normal((2, 3, 10, 6), seed=8)  # stack 1, inputs (3, 10) -> I = 30, blocks of 8 (last 6)
  qk = quant.quantize_int8(jnp.asarray(w), stack=1, inputs=2, block_size=8)
  assert qk.codes.shape == w.shape and qk.absmax.shape == (2, 4, 6)
  m = w.reshape(2, 30, 6)
  blocks = [m[:, i:i + 8] for i in range(0, 30, 8)]
  np.testing.assert_array_equal(qk.absmax, np.stack([np.abs(b).max(axis=1) for b in blocks], 1))
  err = np.abs(np.asarray(quant.dequantize(qk)) - w).reshape(2, 30, 6)
  scale = np.repeat(np.asarray(qk.absmax), 8, axis=1)[:, :30] / 127
  assert np.all(err <= scale / 2 * (1 + 1e-5))
  z = quant.quantize_int8(jnp.zeros((8, 4)))
  np.testing.assert_array_equal(quant.dequantize(z), np.zeros((8, 4)))


# ---------------------------------------------------------------------------
# Refusals


def test_refusals():
  f = jnp.ones((8, 8))
  for bad in (jnp.ones((8, 8), jnp.int8), jnp.ones((8, 8), bool)):
    with pytest.raises(ValueError, match="floating-point kernels"):
      quant.quantize_nf4(bad)
    with pytest.raises(ValueError, match="floating-point kernels"):
      quant.quantize_int8(bad)
    with pytest.raises(ValueError, match=r"'model/q_proj/kernel'.*quantize\(params"):
      quant.check_float_kernel(bad, "model/q_proj/kernel")
  quant.check_float_kernel(f, "k")
  quant.check_float_kernel(jax.ShapeDtypeStruct((8, 8), jnp.bfloat16), "k")
  qk = quant.quantize_nf4(f)
  quant.check_float_kernel(qk, "k")
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize_nf4(qk)
  with pytest.raises(ValueError, match="stack=2 must be an int in"):
    quant.quantize_nf4(f, stack=2)
  with pytest.raises(ValueError, match="block_size must be a positive even int"):
    quant.quantize_nf4(f, block_size=63)
  with pytest.raises(ValueError, match="inputs=2 must leave at least one output axis"):
    quant.quantize_int8(f, inputs=2)
  with pytest.raises(ValueError, match="expects an NF4Kernel or Int8Kernel"):
    quant.dequantize(f)


# ---------------------------------------------------------------------------
# Params trees


def _params():
  return {
      "embed_tokens": {"embedding": _normal((64, 16), 10)},
      "layers": {"self_attn": {"q_proj": {"kernel": _normal((2, 16, 32), 11)}},
                 "mlp": {"down_proj": {"kernel": _normal((2, 32, 16), 12), "bias": np.zeros((2, 16))}}},
      "lm_head": {"kernel": nn.Partitioned(_normal((16, 64), 13), ("fsdp", "tensor"))},
  }


LAYOUTS = {"layers/self_attn/q_proj": KernelLayout(1, 1), "layers/mlp/down_proj": KernelLayout(1, 1)}


def test_quantize_params_selection():
  params = _params()
  q = quant.quantize(params, layouts=LAYOUTS)  # all-linear: not lm_head, not the embedding
  assert quant.is_quantized(q["layers"]["self_attn"]["q_proj"]["kernel"])
  assert quant.is_quantized(q["layers"]["mlp"]["down_proj"]["kernel"])
  assert q["layers"]["mlp"]["down_proj"]["kernel"].stack_shape == (2,)
  assert q["layers"]["mlp"]["down_proj"]["bias"] is params["layers"]["mlp"]["down_proj"]["bias"]
  assert not quant.is_quantized(q["lm_head"]["kernel"]) and not quant.is_quantized(q["embed_tokens"]["embedding"])
  assert isinstance(q["lm_head"]["kernel"], np.ndarray)  # unboxed
  back = quant.dequantize_params(q)
  for path in LAYOUTS:
    w, deq = _kernel_at(params, path), _kernel_at(back, path)
    assert deq.shape == w.shape and deq.dtype == w.dtype
    np.testing.assert_array_equal(deq, quant.dequantize(_kernel_at(q, path)))
    assert np.max(np.abs(deq - w)) <= np.abs(w).max() * (H4 + 0.02)

  only = quant.quantize(params, method="int8", target_modules=["q_proj", "lm_head"], layouts=LAYOUTS)
  assert isinstance(only["lm_head"]["kernel"], quant.Int8Kernel)
  assert isinstance(only["layers"]["self_attn"]["q_proj"]["kernel"], quant.Int8Kernel)
  assert not quant.is_quantized(only["layers"]["mlp"]["down_proj"]["kernel"])

  emb = quant.quantize(params, target_modules="embed_tokens|lm_head", quantize_embeddings=True)
  assert quant.is_quantized(emb["embed_tokens"]["embedding"]) and quant.is_quantized(emb["lm_head"]["kernel"])
  with pytest.raises(ValueError, match="quantize_embeddings=True"):
    quant.quantize(params, target_modules=["embed_tokens"])
  with pytest.raises(ValueError, match="matches no module"):
    quant.quantize(params, target_modules=["nope"])
  with pytest.raises(ValueError, match="cannot tell stacked|kernel_layouts"):
    quant.quantize(params)  # 3-D kernels need layouts
  with pytest.raises(ValueError, match="method='fp4' is not one of"):
    quant.quantize(params, method="fp4", layouts=LAYOUTS)
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize(q, target_modules=["q_proj"], layouts=LAYOUTS)
  bad = {"dense": {"kernel": np.ones((4, 4), np.int8)}}
  with pytest.raises(ValueError, match="'dense/kernel' has dtype int8"):
    quant.quantize(bad)


def _kernel_at(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree["kernel"]


# ---------------------------------------------------------------------------
# Sharding


def test_quantized_specs_rule():
  mesh = AbstractMesh((4, 2), ("fsdp", "tensor"))
  w = jax.ShapeDtypeStruct((2, 64, 96), jnp.float32)
  nf4 = jax.eval_shape(lambda x: quant.quantize_nf4(x, stack=1), w)
  s = quant.quantized_shardings(nf4, NamedSharding(mesh, P(None, "fsdp", "tensor")))
  assert (s.codes.spec, s.absmax_codes.spec) == (P(None, "fsdp"), P(None, "fsdp"))
  assert s.absmax_scale.spec == P(None, None)  # one block of 256: not divisible by 4
  assert s.absmax_offset.spec == P(None) and s.absmax is None
  out_only = quant.quantized_specs(nf4, P(None, None, "tensor"))
  assert out_only.codes == P(None, "tensor")
  assert quant.quantized_specs(nf4, P()).codes == P(None, None)
  i8 = jax.eval_shape(lambda x: quant.quantize_int8(x, stack=1), w)
  s8 = quant.quantized_shardings(i8, NamedSharding(mesh, P(None, "fsdp", "tensor")))
  assert s8.codes.spec == P(None, "fsdp", "tensor") and s8.absmax.spec == P(None, None, "tensor")


def test_sharded_quantization_on_8_devices():
  script = Path(__file__).with_name("_quant_multidevice.py")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run([sys.executable, str(script)], cwd=script.parent.parent, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  nf4, i8 = out["nf4"], out["int8"]
  for r in (nf4, i8):
    assert r["specs"] == r["expected"]
    assert r["codes_equal_to_single_device"]
    assert r["max_rel_diff_to_single_device"] < 1e-6  # the mean absmax: summation order
    assert r["dequantized_max_rel_diff"] < 1e-6
    assert r["dequantized_specs"] == {"layers/q_proj/kernel": "P(None, 'fsdp', 'tensor')",
                                      "o_proj/kernel": "P('tensor', 'fsdp')"}
  assert nf4["specs"]["layers/q_proj/kernel/codes"] == "P(None, 'fsdp')"
  assert nf4["specs"]["layers/q_proj/kernel/absmax_scale"] == "P(None, None)"
  assert nf4["specs"]["o_proj/kernel/codes"] == "P('tensor',)"
  assert nf4["codes_bytes"]["per_device"] * 4 == nf4["codes_bytes"]["total"]
  assert i8["specs"]["layers/q_proj/kernel/codes"] == "P(None, 'fsdp', 'tensor')"
  assert i8["specs"]["o_proj/kernel/absmax"] == "P(None, 'fsdp')"
  assert i8["codes_bytes"]["per_device"] * 8 == i8["codes_bytes"]["total"]
  assert out["layer_slice_equal"]
