"""Array math of one adapted kernel, in the Flax layout.

A kernel is seen as a matrix ``W0: [I, O]`` (input features first). LoRA adds
``s·A B`` with ``A: [I, r]``, ``B: [r, O]``; DoRA rescales each output column:

    W' = m ⊙ (W0 + s·A B) / ||W0 + s·A B||_c

where ``||·||_c`` is the L2 norm over the input axis, one value per output
feature (PEFT's ``dim=1`` norm on a torch ``[out, in]`` weight). Norms are
computed in float32 and clamped away from zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

NORM_EPS = 1e-12
"""Floor of a column norm, so zero columns give ``g = m / eps`` instead of NaN."""

_F32 = jnp.float32


def _dot(x: Array, y: Array, dims) -> Array:
  return jax.lax.dot_general(x, y, (dims, ((), ())), preferred_element_type=_F32)


def column_norm_sq(w: Array) -> Array:
  """Squared L2 norm of each column of ``w: [I, O]`` -> ``[O]`` float32.

  The one ``||W0||²_c`` of the library (initial magnitudes, the forward's norm, the
  cached base norms), so ``g = m / n`` is exactly 1 at init. A dot with float32
  accumulation on ``w`` in its own dtype, never ``w.astype(float32)``: under ``nn.scan``
  XLA may hoist such a cast out of the loop and hold a float32 copy of every stacked
  kernel. bf16 products are exact in float32.
  """
  return jax.lax.dot_general(w, w, (((0,), (0,)), ((1,), (1,))), preferred_element_type=_F32)


def column_norm(w: Array) -> Array:
  """L2 norm of each column of ``w: [I, O]`` -> ``[O]`` float32, clamped at ``NORM_EPS``."""
  return jnp.maximum(jnp.sqrt(column_norm_sq(w)), NORM_EPS)


def lora_delta(a: Array, b: Array, scale: float) -> Array:
  """The low-rank update ``s·A B``: ``[I, r] x [r, O] -> [I, O]`` float32."""
  return scale * _dot(a, b, ((1,), (0,)))


def factored_column_norm_sq(
    w0: Array, a: Array, b: Array, scale: float, w0_norm_sq: Array | None = None
) -> Array:
  """``||W0 + s·A B||²_c`` without forming an ``[I, O]`` temporary.

  Uses ``||W0||²_c + 2s·Σ_r (AᵀW0 ∘ B) + s²·Σ_r ((AᵀA) B ∘ B)``: ``I·O·r``
  flops and ``[r, O]`` memory. The operands keep their dtype; products
  accumulate in float32.

  Args:
    w0: base kernel ``[I, O]``.
    a: ``[I, r]``.
    b: ``[r, O]``.
    scale: ``s``.
    w0_norm_sq: optional cached ``||W0||²_c`` ``[O]`` (it never changes).

  Returns:
    ``[O]`` float32, clamped at 0 (cancellation can make it slightly negative).
  """
  if w0_norm_sq is None:
    w0_norm_sq = column_norm_sq(w0)
  # Cast the small operand, never the kernel: a float32 copy of a bf16 W0 costs memory.
  a_w0 = _dot(a.astype(w0.dtype), w0, ((0,), (0,)))  # [r, O]
  gram = _dot(a, a, ((0,), (0,)))  # [r, r]
  b32 = b.astype(_F32)
  cross = jnp.sum(a_w0 * b32, axis=0)  # [O]
  quad = jnp.sum(jnp.dot(gram, b32) * b32, axis=0)  # [O]
  return jnp.maximum(w0_norm_sq + 2.0 * scale * cross + (scale * scale) * quad, 0.0)


def factored_column_norm(
    w0: Array, a: Array, b: Array, scale: float, w0_norm_sq: Array | None = None
) -> Array:
  """``||W0 + s·A B||_c`` ``[O]`` float32, clamped at ``NORM_EPS``; see
  :func:`factored_column_norm_sq`."""
  return jnp.maximum(
      jnp.sqrt(factored_column_norm_sq(w0, a, b, scale, w0_norm_sq)), NORM_EPS
  )


def dora_column_scale(magnitude: Array, norm: Array) -> Array:
  """``g = m / stop_gradient(n)``: the per-output-feature DoRA factor ``[O]``.

  The norm is detached as in the paper (§4.3) and PEFT, so
  ``∇_V' L = (m/n) ∇_W' L`` and ``∇_m L = Σ dy ⊙ u / n``.
  """
  return magnitude.astype(_F32) / jax.lax.stop_gradient(norm.astype(_F32))


def merge_kernel(
    w0: Array, a: Array, b: Array, scale: float, magnitude: Array | None = None,
    *, return_norm: bool = False,
) -> Array | tuple[Array, Array]:
  """The adapted kernel ``W'`` ``[I, O]`` in ``w0``'s dtype.

  LoRA (``magnitude is None``): ``W0 + s·A B``. DoRA:
  ``m ⊙ (W0 + s·A B) / ||W0 + s·A B||_c`` with the norm detached.
  With ``return_norm``, also ``||W0 + s·A B||_c`` ``[O]`` float32, which
  :func:`unmerge_kernel` needs to invert a DoRA merge.
  """
  v = w0.astype(_F32) + lora_delta(a, b, scale)
  norm = column_norm(v)
  if magnitude is not None:
    v = v * dora_column_scale(magnitude, norm)
  return (v.astype(w0.dtype), norm) if return_norm else v.astype(w0.dtype)


def unmerge_kernel(
    w_merged: Array,
    a: Array,
    b: Array,
    scale: float,
    magnitude: Array | None = None,
    direction_norm: Array | None = None,
) -> Array:
  """Inverse of :func:`merge_kernel`: recover ``W0`` ``[I, O]``.

  For DoRA the merged weight keeps the direction of ``V' = W0 + s·A B`` but not
  its length, so the norm ``||V'||_c`` at merge time (``direction_norm``,
  ``[O]``) is required: ``W0 = W' · n / m − s·A B``.
  """
  w = w_merged.astype(_F32)
  if magnitude is not None:
    if direction_norm is None:
      raise ValueError(
          "Unmerging a DoRA kernel needs the column norm ||W0 + sAB||_c from merge"
          " time: the merged weight only keeps its direction. Use"
          " merge(..., return_norms=True) and pass those norms to unmerge."
      )
    w = w * (direction_norm.astype(_F32) / magnitude.astype(_F32))
  return (w - lora_delta(a, b, scale)).astype(w_merged.dtype)


class Decomposition(NamedTuple):
  """Magnitude ``[O]`` and unit-column direction ``[I, O]`` of a kernel."""

  magnitude: Array
  direction: Array


def decompose_kernel(w: Array) -> Decomposition:
  """Split ``w: [I, O]`` into ``||w||_c`` and ``w / ||w||_c`` (paper eq. 2)."""
  m = column_norm(w)
  return Decomposition(m, (w.astype(_F32) / m).astype(w.dtype))


def decomposition_shift(w0: Array, wt: Array) -> tuple[Array, Array]:
  """The paper's weight-decomposition analysis (§3, Fig. 2) for one kernel.

  Args:
    w0: the pre-trained kernel ``[I, O]``.
    wt: the fine-tuned (merged) kernel ``[I, O]``.

  Returns:
    ``(ΔM, ΔD)``: ``mean_n |m_n^t − m_n^0|`` and ``mean_n (1 − cos(W_n^t, W0_n))``
    over the output features ``n``, as float32 scalars.
  """
  w0 = w0.astype(_F32)
  wt = wt.astype(_F32)
  m0, mt = column_norm(w0), column_norm(wt)
  delta_m = jnp.mean(jnp.abs(mt - m0))
  # 1 − cos(u, v) = ||u/|u| − v/|v|||² / 2: no cancellation for the small direction changes
  # fine-tuning makes (1 − cos in float32 loses them below ~1e-7).
  diff = wt / mt - w0 / m0
  return delta_m, jnp.mean(0.5 * jnp.sum(diff * diff, axis=0))


def kaiming_uniform_a(key: Array, shape: tuple[int, ...], dtype) -> Array:
  """PEFT's default ``A`` init: torch ``kaiming_uniform_(a=sqrt(5))``.

  For ``lora_A.weight: [r, I]`` torch's fan-in is ``I``, so the bound is
  ``sqrt(6 / ((1 + 5) · I)) = 1/sqrt(I)``. ``shape`` is ``[..., I, r]``.
  """
  fan_in = shape[-2]
  bound = 1.0 / jnp.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def gaussian_a(key: Array, shape: tuple[int, ...], dtype) -> Array:
  """PEFT's ``init_lora_weights="gaussian"``: normal ``A`` with std ``1/r``; ``shape`` is ``[..., I, r]``."""
  return jax.random.normal(key, shape, dtype) / shape[-1]
