"""The factored adapted forward of one linear layer, in einsum letters.

Shared by the Linen interceptor (:mod:`dora_jax.linen`) and the NNX wrapper
(:mod:`dora_jax.nnx`): given the base module's own output ``y0 = x W0 + b``,
:func:`factored_output` adds the low-rank term and the DoRA column scale
without forming ``W'`` (PEFT semantics: the bias is never rescaled).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import opt_einsum

from dora_jax import core

Array = jax.Array
_F32 = jnp.float32

DORA_PATHS = ("factored", "custom_vjp", "merged")
"""How a DoRA layer runs in training (:func:`dora_jax.wrap`'s ``dora_path``):

- ``"factored"``: the factored forward below, differentiated by autodiff. It keeps
  the un-scaled output ``u = x W0 + s(xA)B`` of every layer for ``∇m``.
- ``"custom_vjp"``: the same forward under a ``jax.custom_vjp`` that keeps the layer's
  output ``y`` instead (``∇m = Σ dy ⊙ (y − b) / m``), a buffer the next op usually keeps
  anyway, and computes the norm from the kernel's own dtype with float32 accumulation.
- ``"merged"``: materializes ``W'`` and runs the module's own op on it (the reference;
  handled by the framework glue, not here).
"""

@dataclasses.dataclass(frozen=True)
class Projection:
  """A linear layer ``y = x ⋅ W`` written in einsum letters, the kernel viewed as ``[I, O]``.

  Attributes:
    lhs: letters of the input ``x`` (one per axis).
    ins: letters of the kernel's input axes, in the order they flatten to ``I``.
    outs: letters of the kernel's output axes, in the order they flatten to ``O``.
    out: letters of the output ``y``; holds every letter of ``outs``.
    in_shape: sizes of ``ins`` (product ``I``).
    out_shape: sizes of ``outs`` (product ``O``).
  """

  lhs: str
  ins: str
  outs: str
  out: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @classmethod
  def dense(cls, x_ndim: int, axis: Sequence[int], in_shape: Sequence[int],
            out_shape: Sequence[int]) -> "Projection":
    """``nnx.Linear`` / ``nnx.LinearGeneral``: contract ``x``'s ``axis`` (in kernel order)
    with a kernel ``[*in_shape, *out_shape]``; ``y`` is ``[*other axes of x, *out_shape]``."""
    axis = tuple(ax % x_ndim for ax in axis)
    lhs = string.ascii_letters[:x_ndim]
    outs = string.ascii_letters[x_ndim : x_ndim + len(out_shape)]
    ins = "".join(lhs[ax] for ax in axis)
    free = "".join(c for i, c in enumerate(lhs) if i not in axis)
    return cls(lhs, ins, outs, free + outs, tuple(in_shape), tuple(out_shape))

  @classmethod
  def einsum(cls, equation: str, x_shape: Sequence[int], kernel_shape: Sequence[int]) -> "Projection":
    """``nnx.Einsum``: ``equation`` is ``"lhs,rhs->out"`` with the kernel as ``rhs``.

    Raises:
      ValueError: if the kernel axes do not split into input axes (contracted with
        ``x``) and output axes (kept in ``y``, absent from ``x``).
    """
    rhs, ins, outs = einsum_kernel_axes(equation)
    operands, out, _ = opt_einsum.parser.parse_einsum_input(
        (equation.replace(" ", ""), jax.ShapeDtypeStruct(tuple(x_shape), _F32),
         jax.ShapeDtypeStruct(tuple(kernel_shape), _F32)))
    lhs = operands.split(",")[0]
    missing = [c for c in ins if c not in lhs]
    if missing:
      raise ValueError(f"Einsum '{equation}': kernel axes {missing} are not contracted with the input.")
    size = dict(zip(rhs, kernel_shape))
    return cls(lhs, ins, outs, out, tuple(size[c] for c in ins), tuple(size[c] for c in outs))

  @property
  def i_dim(self) -> int:
    return math.prod(self.in_shape)

  @property
  def o_dim(self) -> int:
    return math.prod(self.out_shape)

  @property
  def free(self) -> str:
    """Letters of ``x`` that are not contracted with the kernel."""
    return "".join(c for c in self.lhs if c not in self.ins)

  def _rank_letter(self) -> str:
    used = self.lhs + self.ins + self.outs + self.out
    return next(c for c in string.ascii_letters if c not in used)

  def _out_broadcast_shape(self) -> list[int]:
    return [self.out_shape[self.outs.index(c)] if c in self.outs else 1 for c in self.out]

  def low_rank(self, x: Array, a: Array, b: Array, dtype) -> Array:
    """``(x A) B`` in ``y``'s layout, float32; ``a: [I, r]``, ``b: [r, O]``.

    Operands are cast to ``dtype``; ``x A`` is rounded to ``dtype`` before ``B``.
    """
    return self.up(self.down(x, a, dtype), b, dtype)

  def down(self, x: Array, a: Array, dtype) -> Array:
    """``h = x A`` ``[*free, r]`` in ``dtype`` (accumulated in float32)."""
    r, rl = a.shape[-1], self._rank_letter()
    h = jnp.einsum(f"{self.lhs},{self.ins}{rl}->{self.free}{rl}", x.astype(dtype),
                   a.astype(dtype).reshape(*self.in_shape, r), preferred_element_type=_F32)
    return h.astype(dtype)

  def up(self, h: Array, b: Array, dtype) -> Array:
    """``h B`` in ``y``'s layout, float32; ``h: [*free, r]``, ``b: [r, O]``."""
    r, rl = b.shape[0], self._rank_letter()
    return jnp.einsum(f"{self.free}{rl},{rl}{self.outs}->{self.out}", h.astype(dtype),
                      b.astype(dtype).reshape(r, *self.out_shape), preferred_element_type=_F32)

  def up_transpose(self, dlow: Array, h: Array, b: Array) -> tuple[Array, Array]:
    """Cotangents of :meth:`up` for ``dlow`` (``y``'s layout): ``(dh [*free, r], dB [r, O])``.

    Float32 accumulation; ``dh`` in ``dlow``'s dtype, ``dB`` float32.
    """
    r, rl = b.shape[0], self._rank_letter()
    dt = dlow.dtype
    dh = jnp.einsum(f"{self.out},{rl}{self.outs}->{self.free}{rl}", dlow,
                    b.astype(dt).reshape(r, *self.out_shape), preferred_element_type=_F32)
    db = jnp.einsum(f"{self.free}{rl},{self.out}->{rl}{self.outs}", h.astype(dt), dlow,
                    preferred_element_type=_F32)
    return dh.astype(dt), db.reshape(r, self.o_dim)

  def down_transpose(self, dh: Array, x: Array, a: Array) -> tuple[Array, Array]:
    """Cotangents of :meth:`down` for ``dh``: ``(dx [lhs], dA [I, r])``, float32 accumulation.

    ``dx`` in ``dh``'s dtype, ``dA`` float32.
    """
    r, rl = a.shape[-1], self._rank_letter()
    dt = dh.dtype
    dx = jnp.einsum(f"{self.free}{rl},{self.ins}{rl}->{self.lhs}", dh,
                    a.astype(dt).reshape(*self.in_shape, r), preferred_element_type=_F32)
    da = jnp.einsum(f"{self.lhs},{self.free}{rl}->{self.ins}{rl}", x.astype(dt), dh,
                    preferred_element_type=_F32)
    return dx.astype(dt), da.reshape(self.i_dim, r)

  def per_output_sum(self, t: Array) -> Array:
    """Sums ``t`` (``y``'s layout) over every non-output axis -> ``[O]`` (``outs`` order)."""
    return jnp.einsum(f"{self.out}->{self.outs}", t).reshape(self.o_dim)

  @property
  def keeps_free_axes(self) -> bool:
    """Whether every non-contracted axis of ``x`` is kept in ``y`` (no summed batch axes)."""
    return set(self.free) <= set(self.out)

  def base(self, x: Array, w_mat: Array, dtype) -> Array:
    """``x W0`` (no bias) in ``y``'s layout, float32; ``w_mat: [I, O]``."""
    return jnp.einsum(f"{self.lhs},{self.ins}{self.outs}->{self.out}", x.astype(dtype),
                      w_mat.astype(dtype).reshape(*self.in_shape, *self.out_shape),
                      preferred_element_type=_F32)

  def per_output(self, v: Array) -> Array:
    """A per-output-feature vector ``[O]`` (``outs`` order) broadcastable against ``y``."""
    t = v.reshape(self.out_shape)
    order = sorted(range(len(self.outs)), key=lambda i: self.out.index(self.outs[i]))
    return jnp.transpose(t, order).reshape(self._out_broadcast_shape())

  def output_bias(self, bias: Array) -> Array:
    """A module's bias (its output axes in ``y``'s order, as Flax stores it) broadcastable against ``y``."""
    return bias.reshape(self._out_broadcast_shape())


def factored_output(
    proj: Projection,
    y0: Array,
    x_in: Array,
    w_mat: Array,
    a: Array,
    b: Array,
    scale: float,
    magnitude: Array | None = None,
    bias: Array | None = None,
    dropped: bool = False,
    path: str = "factored",
    w0_norm_sq: Array | None = None,
) -> Array:
  """The adapted output from the base output, without forming ``W'`` (PEFT semantics).

  Args:
    proj: how the layer contracts its input with the kernel matrix.
    y0: the base module's output ``x W0 + b`` (its dtype is the compute dtype).
    x_in: the adapter's input: ``drop(x)`` when ``dropped``, else ``x``.
    w_mat: the base kernel as ``[I, O]``.
    a: ``[I, r]``. b: ``[r, O]``. scale: ``s``.
    magnitude: DoRA's ``m [O]``; ``None`` for LoRA.
    bias: the module's bias (needed for DoRA without dropout: ``x W0 = y0 − b``).
    dropped: whether ``x_in`` is a dropped-out input; then DoRA computes
      ``drop(x) W0`` with one more matmul, as PEFT does.
    path: ``"factored"`` (autodiff) or ``"custom_vjp"`` (:func:`dora_scaled_output`;
      DoRA without dropout only, other cases run ``"factored"``). See :data:`DORA_PATHS`.
    w0_norm_sq: optional cached ``||W0||²_c`` ``[O]`` float32 (it never changes).

  Returns:
    LoRA ``y0 + s·(x_in A) B``; DoRA ``y0 + (g − 1)·(x_in W0) + g·s·(x_in A) B`` with
    ``g = m / sg(||W0 + sAB||_c)``, in ``y0``'s dtype.
  """
  if path not in ("factored", "custom_vjp"):
    raise ValueError(f"factored_output path must be 'factored' or 'custom_vjp', got {path!r}.")
  dt = y0.dtype
  if (path == "custom_vjp" and magnitude is not None and not dropped
      and proj.keeps_free_axes):
    return dora_scaled_output(proj, y0, x_in, w_mat, a, b, scale, magnitude, bias, w0_norm_sq)
  low = scale * proj.low_rank(x_in, a, b, dt)
  if magnitude is None:
    return (y0.astype(_F32) + low).astype(dt)
  norm = core.factored_column_norm(w_mat, a, b, scale, w0_norm_sq)
  g = proj.per_output(core.dora_column_scale(magnitude, norm))
  if dropped:
    base = proj.base(x_in, w_mat, dt)
  else:
    base = y0.astype(_F32)
    if bias is not None:
      base = base - proj.output_bias(bias).astype(_F32)
  return (y0.astype(_F32) + (g - 1.0) * base + g * low).astype(dt)


# ---------------------------------------------------------------------------
# The custom_vjp path


def column_norm_sq_lowp(w_mat: Array) -> Array:
  """``||W0||²_c`` ``[O]`` float32 from ``w_mat: [I, O]`` in its own dtype.

  A dot with float32 accumulation (``preferred_element_type``), never
  ``w.astype(float32)``: under ``nn.scan`` XLA may hoist such a cast out of the
  loop and hold a float32 copy of every stacked base kernel. bf16 products are
  exact in float32, so this equals the float32 norm up to the summation order.
  """
  return jax.lax.dot_general(w_mat, w_mat, (((0,), (0,)), ((1,), (1,))),
                             preferred_element_type=_F32)


def direction_norm(w_mat: Array, a: Array, b: Array, scale: float,
                   w0_norm_sq: Array | None = None) -> Array:
  """Detached ``||W0 + s·A B||_c`` ``[O]`` float32, with no float32 copy of ``W0``."""
  if w0_norm_sq is None:
    w0_norm_sq = column_norm_sq_lowp(w_mat)
  norm = core.factored_column_norm(w_mat, a, b, scale, w0_norm_sq.astype(_F32))
  return jax.lax.stop_gradient(norm)


def dora_scaled_output(
    proj: Projection,
    y0: Array,
    x: Array,
    w_mat: Array,
    a: Array,
    b: Array,
    scale: float,
    magnitude: Array,
    bias: Array | None = None,
    w0_norm_sq: Array | None = None,
) -> Array:
  """DoRA without dropout, ``y = g ⊙ (y0 − b + s·(x A) B) + b``, with a backward that keeps ``y``.

  Equals :func:`factored_output`'s DoRA form (same forward ops). The norm
  ``n = ||W0 + sAB||_c`` is detached (:func:`direction_norm`); ``g = m / n``.
  Gradients (``dy`` the output cotangent, sums over every non-output axis):

  - ``∇y0 = g ⊙ dy``: the module's own matmul turns it into ``g·dy W0ᵀ``, which is
    ``dy W0ᵀ`` plus the ``(g − 1)·dy W0ᵀ`` term of ``(g − 1)·x W0``;
  - ``∇B = s·(xA)ᵀ (g ⊙ dy)``, ``∇A = xᵀ (s·(g ⊙ dy) Bᵀ)``, ``∇x += s·(g ⊙ dy) Bᵀ Aᵀ``;
  - ``∇m = Σ dy ⊙ u / n`` with ``u = x W0 + s(xA)B = (y − b) / g``, so
    ``∇m = Σ dy ⊙ (y − b) / m``: only ``y`` (and ``x``, ``x A``) are kept, not ``u``.
    Requires ``m ≠ 0`` (magnitudes start at the positive base norm).
  """
  norm = direction_norm(w_mat, a, b, scale, w0_norm_sq)
  bias_b = None if bias is None else proj.output_bias(bias)
  # Cast outside the custom_vjp, so autodiff maps dx back to x's dtype.
  return _dora_scaled(proj, float(scale), y0, x.astype(y0.dtype), a, b, magnitude, norm, bias_b)


def _dora_forward(proj, scale, y0, x, a, b, magnitude, norm, bias_b):
  dt = y0.dtype
  h = proj.down(x, a, dt)
  low = scale * proj.up(h, b, dt)
  g = proj.per_output(core.dora_column_scale(magnitude, norm))
  base = y0.astype(_F32)
  if bias_b is not None:
    base = base - bias_b.astype(_F32)
  y = (y0.astype(_F32) + (g - 1.0) * base + g * low).astype(dt)
  return y, h, g


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dora_scaled(proj, scale, y0, x, a, b, magnitude, norm, bias_b):
  return _dora_forward(proj, scale, y0, x, a, b, magnitude, norm, bias_b)[0]


def _dora_scaled_fwd(proj, scale, y0, x, a, b, magnitude, norm, bias_b):
  y, h, g = _dora_forward(proj, scale, y0, x, a, b, magnitude, norm, bias_b)
  # Residuals: y (the output, which the next op usually keeps too), x (the base
  # matmul keeps it), h = xA ([*free, r]), and small vectors. Not u = x W0 + s(xA)B.
  return y, (y, x, h, a, b, magnitude, norm, g, bias_b)


def _dora_scaled_bwd(proj, scale, res, dy):
  y, x, h, a, b, magnitude, norm, g, bias_b = res
  dt = y.dtype
  dy32 = dy.astype(_F32)
  dyg = g * dy32
  dh, db = proj.up_transpose((scale * dyg).astype(dt), h, b)
  dx, da = proj.down_transpose(dh, x, a)
  u_times_g = y.astype(_F32) if bias_b is None else y.astype(_F32) - bias_b.astype(_F32)
  dm = proj.per_output_sum(dy32 * u_times_g) / magnitude.astype(_F32)
  dbias = None
  if bias_b is not None:  # y depends on b explicitly through −(g − 1)·b
    axes = tuple(i for i, n in enumerate(bias_b.shape) if n == 1)
    dbias = jnp.sum(dy32 * (1.0 - g), axis=axes, keepdims=True).astype(bias_b.dtype)
  return (dyg.astype(dt), dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype),
          dm.astype(magnitude.dtype), jnp.zeros_like(norm), dbias)


_dora_scaled.defvjp(_dora_scaled_fwd, _dora_scaled_bwd)


def einsum_kernel_axes(equation: str) -> tuple[str, str, str]:
  """``(rhs, ins, outs)`` letters of an Einsum's kernel; ``ins``/``outs`` in kernel order.

  Raises:
    ValueError: if the kernel has an ellipsis or an axis that is both kept in the
      output and present in the input (a batched einsum: one matrix per index).
  """
  eq = equation.replace(" ", "")
  operands, out = eq.split("->")
  lhs, rhs = operands.split(",")
  if "." in rhs:
    raise ValueError(f"Einsum '{equation}': an ellipsis in the kernel operand is not supported.")
  ins = "".join(c for c in rhs if c not in out)
  outs = "".join(c for c in rhs if c in out)
  batched = [c for c in outs if c in lhs]
  if batched or not ins or not outs:
    raise ValueError(
        f"Einsum '{equation}' cannot be adapted as one [I, O] matrix: kernel axes"
        f" {list(rhs)} must split into input axes (contracted with the input) and"
        f" output axes (kept in the output, absent from the input)"
        + (f"; {batched} are batch axes." if batched else "."))
  return rhs, ins, outs
