"""How a linear layer contracts its input with its kernel, in einsum letters.

:class:`Projection` views a Dense / DenseGeneral / Einsum kernel as a matrix
``W0: [I, O]`` and computes ``x A``, ``h B``, ``x W0``, their transposes and
per-output-feature broadcasts in the layer's own output layout, so the adapter
terms are added to the module's output ``y0`` without reshaping ``x`` or ``y``.
Shared by the Linen and NNX front-ends. :class:`ConvProjection` and
:class:`EmbedProjection` give convolutions and embedding lookups the same interface
(:meth:`low_rank`, :meth:`base`, :meth:`per_output`, :meth:`output_bias`) for the factored
forward of :func:`dora_jax.variants.dora.output` (its autodiff path).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import opt_einsum

Array = jax.Array
_F32 = jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _down_product(proj: "Projection", x: Array, a: Array) -> Array:
  """``x A`` ``[*free, r]`` float32 (``a: [I, r]``), its backward :meth:`Projection.down_transpose`."""
  r, rl = a.shape[-1], proj._rank_letter()
  return jnp.einsum(f"{proj.lhs},{proj.ins}{rl}->{proj.free}{rl}", x, a.reshape(*proj.in_shape, r),
                    preferred_element_type=_F32)


def _down_product_fwd(proj, x, a):
  return _down_product(proj, x, a), (x, a)


def _down_product_bwd(proj, residuals, dh):
  x, a = residuals
  dx, da = proj.down_transpose(dh.astype(x.dtype), x, a)
  return dx, da.astype(a.dtype)


_down_product.defvjp(_down_product_fwd, _down_product_bwd)


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
    """``h = x A`` ``[*free, r]`` in ``dtype`` (accumulated in float32).

    Differentiable; its backward is :meth:`down_transpose` (``∇A`` as
    :meth:`down_weight_grad` computes it), the cotangent rounded to ``dtype`` first.
    """
    return _down_product(self, x.astype(dtype), a.astype(dtype)).astype(dtype)

  def down_weight_grad(self, dh: Array, x: Array) -> Array:
    """``∇A = xᵀ ∇h`` ``[I, r]`` float32 for ``dh: [*free, r]``, ``x`` in ``lhs``.

    Computed as ``(∇hᵀ x)ᵀ``: contracting the token axes of ``x`` where they are its
    major axes lets XLA:CPU read ``x`` in place; ``xᵀ ∇h`` as written copied ``x``
    transposed (a ``[I, tokens]`` copy per adapted layer: 2.1 of the 36 ms of op time
    in the ``tiny`` 2×128 LoRA step). The optimization barrier keeps XLA from folding
    the final ``[r, I]`` transpose back into the product.
    """
    rl = self._rank_letter()
    dat = jnp.einsum(f"{self.free}{rl},{self.lhs}->{rl}{self.ins}", dh.astype(x.dtype), x,
                     preferred_element_type=_F32)
    return jnp.moveaxis(jax.lax.optimization_barrier(dat), 0, -1).reshape(self.i_dim, dh.shape[-1])

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
    return dx.astype(dt), self.down_weight_grad(dh, x.astype(dt))

  def base_transpose(self, dy: Array, w_mat: Array) -> Array:
    """Cotangent of :meth:`base` for ``dy`` (``y``'s layout): ``∇x = ∇y W0ᵀ`` in ``x``'s
    layout and ``dy``'s dtype (float32 accumulation); ``w_mat: [I, O]``, cast to ``dy``'s dtype."""
    dt = dy.dtype
    dx = jnp.einsum(f"{self.out},{self.ins}{self.outs}->{self.lhs}", dy,
                    w_mat.astype(dt).reshape(*self.in_shape, *self.out_shape),
                    preferred_element_type=_F32)
    return dx.astype(dt)

  def per_output_sum(self, t: Array) -> Array:
    """Sums ``t`` (``y``'s layout) over every non-output axis -> ``[O]`` (``outs`` order).

    Where ``y`` ends with its output axes (``[*free, *outs]``: every Dense layer), the
    rows are first folded ``k → 1`` (``k`` = 8, 4 or 2 dividing the row count) by an
    elementwise sum of ``k`` row blocks, then reduced. XLA:CPU runs reductions as YNNPACK
    fusions, which cannot read a dynamic slice of a ``scan``-stacked residual in place:
    summing ``dy ⊙ y`` directly copies the whole ``[tokens, O]`` slice first, the fold
    reads it inside an elementwise fusion and leaves a ``[tokens/k, O]`` temporary (the
    ``tiny`` DoRA training step's XLA temporary memory: 232.0 → 228.8 MB for DoRA's ``∇m``).
    The same sum up to the float32 rounding order.
    """
    if not self.out.endswith(self.outs):
      return jnp.einsum(f"{self.out}->{self.outs}", t).reshape(self.o_dim)
    rows = t.reshape(-1, self.o_dim)
    n = rows.shape[0]
    k = next(k for k in (8, 4, 2, 1) if n % k == 0)
    part = rows[: n // k]
    for i in range(1, k):
      part = part + rows[i * (n // k):(i + 1) * (n // k)]
    return jnp.sum(part, axis=0)

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


@dataclasses.dataclass(frozen=True)
class ConvProjection:
  """A convolution ``y = conv(x, W)`` with its kernel ``[*window, C_in, O]`` viewed as
  ``[I = prod(window)·C_in, O]`` (the Flax layout, flattened as :class:`~dora_jax.tree.KernelLayout`).

  PEFT's Conv LoRA (``tuners/lora/layer.py``, ``_ConvNd``): ``A`` is a convolution with the
  layer's window, strides, padding and dilation and ``r`` output channels, ``B`` a 1x1
  convolution (a matmul over channels), so ``(x A) B = conv(x, A B)``: the low-rank term
  equals the merged ``ΔW``'s. (PEFT's own ``lora_A`` omits the layer's dilation — its
  unmerged and merged forwards differ for dilated convs; here both use it.)

  Attributes:
    conv: ``conv(x, kernel) -> y`` without bias, for a kernel ``[*window, C_in, n]`` of
      any ``n`` (the front-end builds it from the module: same strides, padding, dilation).
    kernel_shape: the layer's kernel shape ``[*window, C_in, O]``.
  """

  conv: Callable[[Array, Array], Array]
  kernel_shape: tuple[int, ...]
  keeps_free_axes = False  # the lean custom_vjp path is written for einsum projections

  @property
  def i_dim(self) -> int:
    return math.prod(self.kernel_shape[:-1])

  @property
  def o_dim(self) -> int:
    return self.kernel_shape[-1]

  def down(self, x: Array, a: Array, dtype) -> Array:
    """``h = conv(x, A)`` ``[..., r]`` in ``dtype``; ``a: [I, r]``."""
    k = a.astype(dtype).reshape(*self.kernel_shape[:-1], a.shape[-1])
    return self.conv(x.astype(dtype), k).astype(dtype)

  def low_rank(self, x: Array, a: Array, b: Array, dtype) -> Array:
    """``conv(x, A) B`` ``[..., O]`` float32; ``a: [I, r]``, ``b: [r, O]``."""
    h = self.down(x, a, dtype)
    return jnp.einsum("...r,ro->...o", h, b.astype(dtype), preferred_element_type=_F32)

  def base(self, x: Array, w_mat: Array, dtype) -> Array:
    """``conv(x, W0)`` (no bias) float32; ``w_mat: [I, O]``."""
    k = w_mat.astype(dtype).reshape(self.kernel_shape)
    return self.conv(x.astype(dtype), k).astype(_F32)

  def per_output(self, v: Array) -> Array:
    """``[O]``: channels are the last axis of ``y``."""
    return v

  def output_bias(self, bias: Array) -> Array:
    return bias


@dataclasses.dataclass(frozen=True)
class EmbedProjection:
  """An embedding lookup ``y = W[ids]`` with ``W: [V, D]`` viewed as ``[I = V, O = D]``.

  PEFT's Embedding LoRA (``tuners/lora/layer.py``, ``Embedding.forward``): the low-rank
  term is a lookup of ``A``'s rows times ``B``, ``A[ids] B = (A B)[ids]``. The input is an
  integer array; no dropout applies to it (PEFT neither).
  """

  num_embeddings: int
  features: int
  keeps_free_axes = False

  @property
  def i_dim(self) -> int:
    return self.num_embeddings

  @property
  def o_dim(self) -> int:
    return self.features

  def low_rank(self, ids: Array, a: Array, b: Array, dtype) -> Array:
    """``A[ids] B`` ``[*ids.shape, D]`` float32; ``a: [V, r]``, ``b: [r, D]``."""
    h = jnp.take(a.astype(dtype), ids, axis=0)
    return jnp.einsum("...r,ro->...o", h, b.astype(dtype), preferred_element_type=_F32)

  def base(self, ids: Array, w_mat: Array, dtype) -> Array:
    """``W0[ids]`` float32."""
    return jnp.take(w_mat.astype(dtype), ids, axis=0).astype(_F32)

  def per_output(self, v: Array) -> Array:
    return v

  def output_bias(self, bias: Array) -> Array:
    return bias
