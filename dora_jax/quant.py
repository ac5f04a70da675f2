"""Quantized base kernels for QLoRA / QDoRA: NF4 (with double quantization) and int8.

Pure functions on arrays and pytrees; the front-ends dequantize a kernel inside the
jitted step (one layer at a time under ``nn.scan``).

NF4 (Dettmers et al. 2023, "QLoRA", §3; numerics of bitsandbytes' ``quantize_4bit`` /
``dequantize_4bit`` with ``quant_type="nf4"``): each layer's kernel is flattened
(row-major) into blocks of ``block_size`` (64) values. Per block, ``absmax = max|w|``;
each ``x = w · (1/absmax)`` (float32, clipped to [-1, 1]) maps to the nearest of the 16
:data:`NF4_CODE` values, a tie going to the lower code: the code index is the number of
fp32 midpoints ``(c_i + c_{i+1}) / 2`` strictly below ``x`` (bitsandbytes'
``torch.bucketize`` in ``backends/default/ops.py``; its CUDA ``dQuantizeNF4`` tree has the
same thresholds). Two codes share a byte, the first (even-index) value in the high nibble:
``byte = q[2k] << 4 | q[2k+1]``. Dequantized: ``NF4_CODE[q] · absmax`` in float32.

Double quantization (QLoRA §3, bitsandbytes ``compress_statistics=True``): the absmax
vector minus its mean (the fp32 ``absmax_offset``) is quantized in blocks of 256 with
the signed 8-bit dynamic code (:data:`DYNAMIC_CODE`, ``create_dynamic_map()``), one fp32
``absmax_scale`` per block, by the same nearest-code rule (bitsandbytes' reference
``quantize_blockwise``; its CPU kernel in 0.50 approximates this rule by a 65 536-entry
lookup table and may pick a neighbouring code for values within 2^-15 of a midpoint).
``absmax = DYNAMIC_CODE[absmax_codes] · absmax_scale + absmax_offset``. Cost:
``4 + 8/64 + 32/(64·256)`` ≈ 4.127 bits per parameter (plus 32 bits per layer).

int8 (LLM.int8(), Dettmers et al. 2022, vector-wise; bitsandbytes
``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``): symmetric absmax per output
channel (or per block of ``block_size`` input rows of each output channel),
``q = round_half_even(w · (127/absmax))``, ``w ≈ q · absmax · (1/127)``.

Stacked kernels: with ``stack`` leading (``nn.scan``) axes, each layer is quantized on
its own and every array leaf keeps the stack axes in front, so slicing all leaves
along axis 0 gives that layer's quantized kernel. The per-layer shape and dtype are
static pytree metadata; the stack axes are read from the leaves.

Sizes: a layer whose size is not a multiple of the block size is zero-padded to the next
multiple (the last block's absmax is that of its real values, as bitsandbytes' partial
last block; the padding dequantizes to 0 and is dropped). The absmax vector is padded
likewise to a multiple of 256 for double quantization (padding excluded from the mean).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax import tree as tree_lib
from dora_jax.config import LoraConfig

Array = jax.Array

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
"""The 16 NF4 values (QLoRA appendix E; bitsandbytes ``get_4bit_type("nf4")``), index = code."""

# The 127 positive values of bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7,
# total_bits=8) as bitsandbytes 0.50 builds it with torch.linspace in float32 on an x86-64 CPU
# (they differ from a float64 construction in the last bit of some entries). Shortest round-trip
# float32 literals.
_DYNAMIC_POSITIVE = np.array([
    5.5000004e-7, 3.2500002e-6, 7.75e-6, 2.1249998e-5, 4.375e-5, 6.625e-5, 8.875e-5,
    1.5625001e-4, 2.6875004e-4, 3.8125002e-4, 4.9375003e-4, 6.062501e-4, 7.1875006e-4, 8.3125e-4,
    9.437501e-4, 1.2812499e-3, 1.84375e-3, 2.40625e-3, 2.96875e-3, 3.5312497e-3, 4.09375e-3,
    4.6562497e-3, 5.2187503e-3, 5.78125e-3, 6.34375e-3, 6.90625e-3, 7.46875e-3, 8.03125e-3,
    8.59375e-3, 9.156249e-3, 9.71875e-3, 1.140625e-2, 1.421875e-2, 1.703125e-2, 1.9843752e-2,
    2.265625e-2, 2.546875e-2, 2.8281251e-2, 3.109375e-2, 3.390625e-2, 3.6718752e-2, 3.953125e-2,
    4.2343747e-2, 4.515625e-2, 4.796875e-2, 5.078125e-2, 5.359375e-2, 5.640625e-2, 5.9218753e-2,
    6.203125e-2, 6.484375e-2, 6.7656256e-2, 7.0468746e-2, 7.328125e-2, 7.609375e-2, 7.890625e-2,
    8.171876e-2, 8.453125e-2, 8.734375e-2, 9.015625e-2, 9.2968754e-2, 9.578126e-2, 9.859375e-2,
    1.07031256e-1, 1.2109375e-1, 1.3515624e-1, 1.4921875e-1, 1.6328125e-1, 1.7734376e-1, 1.9140625e-1,
    2.0546874e-1, 2.1953125e-1, 2.3359375e-1, 2.4765624e-1, 2.6171875e-1, 2.7578127e-1, 2.8984374e-1,
    3.0390626e-1, 3.1796873e-1, 3.3203125e-1, 3.4609374e-1, 3.6015624e-1, 3.7421876e-1, 3.8828123e-1,
    4.0234375e-1, 4.1640624e-1, 4.3046874e-1, 4.4453126e-1, 4.5859373e-1, 4.7265625e-1, 4.867187e-1,
    5.0078124e-1, 5.148437e-1, 5.289062e-1, 5.4296875e-1, 5.570313e-1, 5.710938e-1, 5.8515626e-1,
    5.992187e-1, 6.1328125e-1, 6.273438e-1, 6.414063e-1, 6.5546876e-1, 6.695312e-1, 6.8359375e-1,
    6.976563e-1, 7.117188e-1, 7.2578126e-1, 7.398437e-1, 7.5390625e-1, 7.679688e-1, 7.8203124e-1,
    7.9609376e-1, 8.101562e-1, 8.2421875e-1, 8.382813e-1, 8.5234374e-1, 8.6640626e-1, 8.804687e-1,
    8.9453125e-1, 9.085938e-1, 9.2265624e-1, 9.3671876e-1, 9.507812e-1, 9.6484375e-1, 9.789063e-1,
    9.9296874e-1,
], np.float32)

DYNAMIC_CODE = np.concatenate([-_DYNAMIC_POSITIVE[::-1], [0.0], _DYNAMIC_POSITIVE, [1.0]]).astype(np.float32)
"""bitsandbytes' signed 8-bit dynamic code (256 sorted values in [-0.993, 1]), index = code."""

_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
_DYNAMIC_MIDPOINTS = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2)
_INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' int8_vectorwise_dequant factor

METHODS = ("nf4", "int8")


# ---------------------------------------------------------------------------
# Pytree types


class QuantizedKernel:
  """Base of the quantized kernel types; array-like ``shape`` / ``dtype`` / ``ndim``.

  ``shape`` is the shape of the kernel this stands for, stack axes included, so shape-based
  code (layouts, adapters) works unchanged; ``dtype`` is the original kernel's dtype.
  """

  layer_shape: tuple[int, ...]
  kernel_dtype: Any

  @property
  def stack_shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.stack_shape, *self.layer_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.kernel_dtype)


@struct.dataclass
class NF4Kernel(QuantizedKernel):
  """A kernel in NF4, blocks of ``block_size`` along each layer's flattened kernel.

  With ``n = prod(layer_shape)`` padded to ``n_pad`` (multiple of ``block_size``) and
  ``nb = n_pad / block_size`` blocks:

  Attributes:
    codes: uint8 ``[*stack, n_pad // 2]``, two NF4 codes per byte (high nibble first).
    absmax: float32 ``[*stack, nb]`` without double quantization, else None.
    absmax_codes: uint8 ``[*stack, nb2 * absmax_block_size]`` (``nb`` padded), 8-bit
      dynamic codes of ``absmax - absmax_offset``; None without double quantization.
    absmax_scale: float32 ``[*stack, nb2]``, the absmax of each block of 256; or None.
    absmax_offset: float32 ``[*stack]``, the mean absmax of each layer; or None.
    layer_shape: static: one layer's kernel shape.
    kernel_dtype: static: the original kernel's dtype (the default dequantized dtype).
    block_size: static: values per NF4 block (bitsandbytes' ``blocksize``).
    absmax_block_size: static: absmax values per 8-bit block (256).
  """

  codes: Array
  absmax: Array | None
  absmax_codes: Array | None
  absmax_scale: Array | None
  absmax_offset: Array | None
  layer_shape: tuple[int, ...] = struct.field(pytree_node=False)
  kernel_dtype: Any = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False)
  absmax_block_size: int = struct.field(pytree_node=False)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:-1])

  @property
  def double_quant(self) -> bool:
    return self.absmax is None


@struct.dataclass
class Int8Kernel(QuantizedKernel):
  """A kernel in int8 with a symmetric absmax per output channel (and input block).

  With the layer viewed as ``[I, O]`` (``inputs`` leading axes flattened into ``I``) and
  ``G = ceil(I / block_size)`` input blocks (``G = 1`` per channel):

  Attributes:
    codes: int8 ``[*stack, *layer_shape]``, shaped (and sharded) like the kernel.
    absmax: float32 ``[*stack, G, O]``.
    layer_shape, kernel_dtype: static, as in :class:`NF4Kernel`.
    inputs: static: number of input (contracted) axes of ``layer_shape``.
    block_size: static: input rows per scale, or None for one scale per output channel.
  """

  codes: Array
  absmax: Array
  layer_shape: tuple[int, ...] = struct.field(pytree_node=False)
  kernel_dtype: Any = struct.field(pytree_node=False)
  inputs: int = struct.field(pytree_node=False)
  block_size: int | None = struct.field(pytree_node=False)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[: self.codes.ndim - len(self.layer_shape)])


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a quantized kernel (:class:`NF4Kernel` or :class:`Int8Kernel`)."""
  return isinstance(x, QuantizedKernel)


# ---------------------------------------------------------------------------
# Checks


def check_float_kernel(w: Any, path: str = "kernel") -> None:
  """Refuses a base kernel that is neither floating point nor a quantized kernel.

  An integer or bool kernel is silently mishandled by the adapter math (the adapter is
  cast to its dtype, the merge truncates, every adapter gradient is zero).

  Raises:
    ValueError: naming ``path``, the dtype and the fix.
  """
  if is_quantized(w):
    return
  dtype = getattr(w, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"The base kernel at '{path}' has dtype {dtype}: dora_jax adapts floating-point kernels"
        " only (an integer kernel would be mishandled silently). For an 8- or 4-bit base,"
        " quantize the float checkpoint with dora_jax.quant.quantize(params, method='int8' or"
        " 'nf4'); otherwise cast the kernel to float32/bfloat16 first.")


def _check_float(w: Any, fn: str) -> None:
  if is_quantized(w):
    raise ValueError(f"{fn} got a kernel that is already quantized ({type(w).__name__}).")
  dtype = getattr(w, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{fn} quantizes floating-point kernels (float32, bfloat16, float16), got dtype"
        f" {dtype}. Pass the full-precision checkpoint's kernel.")


def _check_stack(w: Any, stack: int, fn: str) -> None:
  if not isinstance(stack, int) or isinstance(stack, bool) or not 0 <= stack < w.ndim:
    raise ValueError(
        f"{fn}: stack={stack!r} must be an int in [0, {w.ndim}) for a kernel of shape"
        f" {tuple(w.shape)} (the leading nn.scan axes; at least one kernel axis must remain).")


def _check_block(value: Any, name: str, even: bool = False) -> None:
  if (not isinstance(value, int) or isinstance(value, bool) or value <= 0
      or (even and value % 2)):
    kind = "a positive even int" if even else "a positive int"
    raise ValueError(f"{name} must be {kind}, got {value!r}.")


# ---------------------------------------------------------------------------
# Quantize / dequantize one kernel


def _nearest_code(x: Array, absmax: Array, midpoints: np.ndarray) -> Array:
  """Index of the nearest code to ``x · (1/absmax)`` (ties to the lower code), int32."""
  inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  scaled = jnp.clip(x * inv, -1.0, 1.0)
  return jnp.sum(scaled[..., None] > jnp.asarray(midpoints), axis=-1, dtype=jnp.int32)


def _pad_last(x: Array, multiple: int) -> Array:
  pad = -x.shape[-1] % multiple
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _nf4_arrays(w, stack, block_size, double_quant, absmax_block_size):
  stack_shape = w.shape[:stack]
  x = _pad_last(jnp.reshape(w, (math.prod(stack_shape), -1)).astype(jnp.float32), block_size)
  blocks = x.reshape(x.shape[0], -1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  q = _nearest_code(blocks, absmax[..., None], _NF4_MIDPOINTS).astype(jnp.uint8)
  q = q.reshape(x.shape[0], -1, 2)
  codes = (q[..., 0] << 4) | q[..., 1]
  out = {"codes": codes, "absmax": absmax}
  if double_quant:
    offset = jnp.mean(absmax, axis=-1)
    centered = _pad_last(absmax - offset[:, None], absmax_block_size)
    centered = centered.reshape(x.shape[0], -1, absmax_block_size)
    scale = jnp.max(jnp.abs(centered), axis=-1)
    qa = _nearest_code(centered, scale[..., None], _DYNAMIC_MIDPOINTS).astype(jnp.uint8)
    out = {"codes": codes, "absmax_codes": qa.reshape(x.shape[0], -1), "absmax_scale": scale,
           "absmax_offset": offset}
  return {k: v.reshape(*stack_shape, *v.shape[1:]) for k, v in out.items()}


def quantize_nf4(w: Array, *, block_size: int = 64, double_quant: bool = True, stack: int = 0,
                 absmax_block_size: int = 256) -> NF4Kernel:
  """NF4-quantizes a kernel, each of its ``stack`` leading layers on its own.

  Args:
    w: a float kernel ``[*stack, *layer_shape]`` (any float dtype; computed in float32).
    block_size: values per block (bitsandbytes' ``blocksize``; 64 in QLoRA). A layer whose
      size is not a multiple is zero-padded (see the module docstring).
    double_quant: quantize the absmax values too (bitsandbytes' ``compress_statistics``).
    stack: number of leading stacked-layer axes (``nn.scan``) kept on every leaf.
    absmax_block_size: absmax values per 8-bit block (256 in bitsandbytes).

  Returns:
    An :class:`NF4Kernel`. jit-able (the options are static); equal in codes to
    bitsandbytes' ``quantize_4bit(w_layer, blocksize, compress_statistics, quant_type="nf4")``.

  Raises:
    ValueError: for a non-float or already quantized ``w``, a bad ``stack`` or block size.
  """
  _check_float(w, "quantize_nf4")
  _check_stack(w, stack, "quantize_nf4")
  _check_block(block_size, "block_size", even=True)
  _check_block(absmax_block_size, "absmax_block_size")
  arrays = _nf4_arrays(w, stack, block_size, bool(double_quant), absmax_block_size)
  return NF4Kernel(
      codes=arrays["codes"], absmax=arrays.get("absmax"), absmax_codes=arrays.get("absmax_codes"),
      absmax_scale=arrays.get("absmax_scale"), absmax_offset=arrays.get("absmax_offset"),
      layer_shape=tuple(w.shape[stack:]), kernel_dtype=np.dtype(w.dtype), block_size=block_size,
      absmax_block_size=absmax_block_size)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _int8_arrays(w, stack, inputs, block_size):
  stack_shape, layer = w.shape[:stack], w.shape[stack:]
  i_dim, o_dim = math.prod(layer[:inputs]), math.prod(layer[inputs:])
  m = jnp.reshape(w, (math.prod(stack_shape), i_dim, o_dim)).astype(jnp.float32)
  bs = block_size or i_dim
  groups = -(-i_dim // bs)
  m = jnp.pad(m, ((0, 0), (0, groups * bs - i_dim), (0, 0))).reshape(-1, groups, bs, o_dim)
  absmax = jnp.max(jnp.abs(m), axis=2)
  scale = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  q = jnp.clip(jnp.round(m * scale[:, :, None, :]), -127, 127).astype(jnp.int8)
  q = q.reshape(-1, groups * bs, o_dim)[:, :i_dim]
  return q.reshape(w.shape), absmax.reshape(*stack_shape, groups, o_dim)


def quantize_int8(w: Array, *, stack: int = 0, inputs: int = 1, block_size: int | None = None
                  ) -> Int8Kernel:
  """int8-quantizes a kernel: symmetric absmax per output channel (optionally per block).

  Args:
    w: a float kernel ``[*stack, *inputs_axes, *output_axes]`` (as :class:`KernelLayout`).
    stack: number of leading stacked-layer axes (``nn.scan``).
    inputs: number of input (contracted) axes after them; the rest are output channels.
    block_size: input rows sharing a scale within each output channel, or None for one
      scale per output channel (LLM.int8()'s vector-wise quantization). An ``I`` that is not
      a multiple gets a shorter last block.

  Returns:
    An :class:`Int8Kernel`; ``block_size=None`` equals bitsandbytes'
    ``int8_vectorwise_quant(w_layer.T)`` (codes and ``absmax``, its ``row_stats``).

  Raises:
    ValueError: for a non-float or already quantized ``w``, bad ``stack`` / ``inputs`` /
      ``block_size``.
  """
  _check_float(w, "quantize_int8")
  _check_stack(w, stack, "quantize_int8")
  if not isinstance(inputs, int) or not 1 <= inputs < w.ndim - stack:
    raise ValueError(f"quantize_int8: inputs={inputs!r} must leave at least one output axis of"
                     f" the layer shape {tuple(w.shape[stack:])} (stack={stack}).")
  if block_size is not None:
    _check_block(block_size, "block_size")
  codes, absmax = _int8_arrays(w, stack, inputs, block_size)
  return Int8Kernel(codes=codes, absmax=absmax, layer_shape=tuple(w.shape[stack:]),
                    kernel_dtype=np.dtype(w.dtype), inputs=inputs, block_size=block_size)


def nf4_absmax(qk: NF4Kernel) -> Array:
  """The per-block absmax ``[*stack, nb]`` (float32), dequantized under double quantization."""
  if not qk.double_quant:
    return qk.absmax
  stack = qk.absmax_codes.shape[:-1]
  nb = -(-math.prod(qk.layer_shape) // qk.block_size)
  vals = jnp.asarray(DYNAMIC_CODE)[qk.absmax_codes].reshape(*stack, -1, qk.absmax_block_size)
  absmax = (vals * qk.absmax_scale[..., None]).reshape(*stack, -1)[..., :nb]
  return absmax + qk.absmax_offset[..., None]


def _dequantize_nf4(qk: NF4Kernel, dtype) -> Array:
  stack = qk.codes.shape[:-1]
  q = jnp.stack([qk.codes >> 4, qk.codes & 0xF], axis=-1).reshape(*stack, -1, qk.block_size)
  vals = jnp.asarray(NF4_CODE)[q] * nf4_absmax(qk)[..., None]
  vals = vals.reshape(*stack, -1)[..., : math.prod(qk.layer_shape)]
  return vals.reshape(*stack, *qk.layer_shape).astype(dtype)


def _dequantize_int8(qk: Int8Kernel, dtype) -> Array:
  stack = qk.stack_shape
  i_dim = math.prod(qk.layer_shape[: qk.inputs])
  groups, o_dim = qk.absmax.shape[-2:]
  bs = qk.block_size or i_dim
  q = qk.codes.reshape(*stack, i_dim, o_dim)
  q = jnp.pad(q, [(0, 0)] * len(stack) + [(0, groups * bs - i_dim), (0, 0)])
  q = q.reshape(*stack, groups, bs, o_dim).astype(jnp.float32)
  vals = (q * qk.absmax[..., None, :]) * _INV_127
  return vals.reshape(*stack, groups * bs, o_dim)[..., :i_dim, :].reshape(qk.shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qk, dtype):
  if isinstance(qk, NF4Kernel):
    return _dequantize_nf4(qk, dtype)
  return _dequantize_int8(qk, dtype)


def dequantize(qk: QuantizedKernel, dtype: Any = None) -> Array:
  """The full-precision kernel ``[*stack, *layer_shape]`` of a quantized kernel.

  Args:
    qk: an :class:`NF4Kernel` or :class:`Int8Kernel`, stacked or a per-layer slice.
    dtype: output dtype; default the original kernel's. Computed in float32 (as
      bitsandbytes), then cast.

  Raises:
    ValueError: if ``qk`` is not a quantized kernel.
  """
  if not is_quantized(qk):
    raise ValueError(f"dequantize expects an NF4Kernel or Int8Kernel, got {type(qk).__name__}.")
  return _dequantize(qk, np.dtype(dtype if dtype is not None else qk.kernel_dtype))


def bits_per_param(qk: QuantizedKernel) -> float:
  """Stored bits (codes, scales, offsets, padding included) per kernel parameter."""
  leaves = jax.tree_util.tree_leaves(qk)
  bits = sum(8 * math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
  return bits / qk.size


# ---------------------------------------------------------------------------
# Params trees


def quantize(params: Any, *, method: str = "nf4",
             target_modules: Sequence[str] | str | None = None,
             exclude_modules: Sequence[str] | str | None = None,
             layouts: Mapping[str, tree_lib.KernelLayout] | None = None,
             block_size: int | None = None, double_quant: bool = True,
             quantize_embeddings: bool = False, shardings: Any = None) -> dict:
  """Replaces the selected kernels of a Linen params tree by quantized kernels.

  Args:
    params: the ``params`` collection (boxed or not; the result is unboxed: derive its
      shardings from the boxed tree with :func:`quantized_param_shardings`).
    method: ``"nf4"`` (QLoRA; :func:`quantize_nf4`) or ``"int8"`` (:func:`quantize_int8`).
    target_modules: as :class:`dora_jax.LoraConfig`'s (suffixes, a full-path regex or
      ``"all-linear"``); None means ``"all-linear"``: every kernel but ``lm_head``, as
      bitsandbytes' 4-bit loading keeps ``lm_head`` in full precision.
    exclude_modules: as :class:`dora_jax.LoraConfig`'s.
    layouts: ``{path: KernelLayout}`` for kernels that are not plain 2-D (stacked by
      ``nn.scan``, ``DenseGeneral``); :func:`dora_jax.kernel_layouts` gives them.
    block_size: NF4 block (default 64) or int8 input block (default None: per channel).
    double_quant: NF4 double quantization of the absmax values.
    quantize_embeddings: also quantize selected ``embedding`` leaves (skipped otherwise).
    shardings: optional sharding tree of ``params`` (``dora_jax.sharding.param_shardings``):
      each kernel is then quantized under ``jit`` straight into the shardings of
      :func:`quantized_shardings`.

  Returns:
    The params (unboxed) with a quantized kernel at each selected ``kernel`` leaf.

  Raises:
    ValueError: for an unknown method, nothing selected, a selected kernel that is not
      float (or already quantized), a kernel > 2-D without a layout, a kernel missing
      from ``shardings``.
  """
  if method not in METHODS:
    raise ValueError(f"quantize: method={method!r} is not one of {METHODS}.")
  plain = tree_lib.unbox(params)
  config = LoraConfig(target_modules="all-linear" if target_modules is None else target_modules,
                      exclude_modules=exclude_modules)
  layouts = dict(layouts or {})
  out, done = plain, []
  for path in tree_lib.select_targets(plain, config, layouts=layouts):
    module = tree_lib.get_path(plain, path)
    key = tree_lib.weight_key(module)
    if key == "embedding" and not quantize_embeddings:
      continue
    w = module[key]
    if is_quantized(w):
      raise ValueError(f"quantize: the {key} at '{path}' is already quantized.")
    check_float_kernel(w, f"{path}/{key}")
    layout = layouts.get(path) or tree_lib.default_layout(path, tuple(w.shape))
    if method == "nf4":
      fn = functools.partial(quantize_nf4, block_size=block_size or 64,
                             double_quant=double_quant, stack=layout.stack)
    else:
      fn = functools.partial(quantize_int8, stack=layout.stack, inputs=layout.inputs,
                             block_size=block_size)
    if shardings is not None:
      try:
        kernel_sharding = tree_lib.get_path(shardings, path)[key]
      except (KeyError, TypeError) as e:
        raise ValueError(f"quantize: shardings has no sharding for '{path}/{key}'; pass the tree"
                         " dora_jax.sharding.param_shardings() gives for these params.") from e
      target = quantized_shardings(jax.eval_shape(fn, w), kernel_sharding)
      fn = jax.jit(fn, out_shardings=target)
    out = tree_lib.set_path(out, path, {**module, key: fn(w)})
    done.append(path)
  if not done:
    raise ValueError(
        f"quantize: target_modules={target_modules!r} selects only embeddings; pass"
        " quantize_embeddings=True to quantize them.")
  return out


def dequantize_params(params: Any, dtype: Any = None) -> Any:
  """``params`` with every quantized kernel dequantized (to its original dtype by default)."""
  return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if is_quantized(x) else x,
                                params, is_leaf=is_quantized)


# ---------------------------------------------------------------------------
# Sharding


def quantized_specs(qk: QuantizedKernel, kernel_spec: Sequence[Any]) -> QuantizedKernel:
  """PartitionSpecs of a quantized kernel's leaves, from the spec of the kernel it replaces.

  Rule (``kernel_spec`` = one entry per kernel axis ``[*stack, *layer]``, padded with None):
  every leaf keeps the stack axes' entries in front. NF4: the flattened block axis of
  ``codes``, ``absmax``, ``absmax_codes`` and ``absmax_scale`` takes the mesh axes of the
  first sharded non-stack kernel axis (row-major flattening keeps contiguous shards);
  ``absmax_offset`` has the stack axes only. int8: ``codes`` have the kernel's spec;
  ``absmax [*stack, G, O]`` takes the first input and first output axis's entries.
  :func:`quantized_shardings` then unshards any leaf dimension its mesh axes do not divide.

  Returns:
    A kernel of the same type with a ``PartitionSpec`` at each array leaf.
  """
  stack = len(qk.stack_shape)
  spec = tuple(kernel_spec) + (None,) * (qk.ndim - len(tuple(kernel_spec)))
  head, layer = spec[:stack], spec[stack:]
  if isinstance(qk, NF4Kernel):
    axes = next((a for a in layer if a is not None), None)
    blocked = lambda x: None if x is None else P(*head, axes)
    return qk.replace(codes=blocked(qk.codes), absmax=blocked(qk.absmax),
                      absmax_codes=blocked(qk.absmax_codes), absmax_scale=blocked(qk.absmax_scale),
                      absmax_offset=None if qk.absmax_offset is None else P(*head))
  ins, outs = layer[: qk.inputs], layer[qk.inputs:]
  return qk.replace(codes=P(*spec), absmax=P(*head, ins[0], outs[0]))


def quantized_shardings(qk: QuantizedKernel, kernel_sharding: NamedSharding) -> QuantizedKernel:
  """``NamedSharding``s of a quantized kernel's leaves (:func:`quantized_specs`'s rule).

  A leaf dimension not divisible by its mesh axes' size is sharded over the longest
  leading run of them that divides it, else replicated
  (:func:`dora_jax.sharding.fit_spec`, logged once). ``qk`` may be abstract
  (``jax.eval_shape``).
  """
  # Imported here: sharding imports tree, and the front-ends' tree may import quant.
  from dora_jax import sharding as sh

  mesh = kernel_sharding.mesh
  specs = quantized_specs(qk, tuple(kernel_sharding.spec))
  return jax.tree_util.tree_map(
      lambda x, s: NamedSharding(mesh, sh.fit_spec(s, x.shape, mesh, what="quantized kernel leaf")),
      qk, specs)


def quantized_param_shardings(qparams: Any, params_shardings: Any) -> Any:
  """Shardings of a quantized params tree from the shardings of the original params.

  Args:
    qparams: the result of :func:`quantize` (arrays or abstract).
    params_shardings: the original params' ``NamedSharding`` tree
      (``dora_jax.sharding.param_shardings``).

  Returns:
    A tree like ``qparams`` (quantized kernels included) of ``NamedSharding``s.
  """
  return jax.tree_util.tree_map(
      lambda x, s: quantized_shardings(x, s) if is_quantized(x) else s,
      qparams, params_shardings, is_leaf=is_quantized)
