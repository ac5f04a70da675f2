"""DoRA (Liu et al., ICML 2024): a magnitude on top of a variant's direction update.

``W' = m ⊙ V / ||V||_c`` with ``V = W0 + ΔW`` and ``ΔW = s·A B`` from any variant's
factors (LoRA: DoRA; VeRA: DVoRA; a dequantized ``W0``: QDoRA). The norm is detached
(paper §4.3, PEFT ``tuners/lora/dora.py``): ``g = m / sg(||V||_c)``. In training ``W'`` is
never formed; from the module's own output ``y0 = x W0 + b`` (PEFT semantics, the bias is
never rescaled)::

    y = y0 + (g − 1) ⊙ (x' W0) + g ⊙ s·(x' A) B        x' = drop(x), x' W0 = y0 − b without dropout

Execution paths (:data:`PATHS`), equal up to rounding:

- ``"custom_vjp"`` (default, the lean one): a hand-written backward that keeps
  ``g·u = y − b`` instead of ``u = x W0 + s(xA)B`` (``∇m = Σ dy ⊙ g·u / m``): for a layer
  without a bias that is the layer's output ``y``, a buffer the next op usually keeps
  anyway; a layer with a bias keeps ``g·u`` next to ``y`` (one more ``[tokens, O]``
  buffer where the next op keeps ``y`` too), since ``y − b`` would lose ``g·u`` to
  rounding where ``|g·u| ≪ |b|`` (a magnitude near 0). A zero or underflowing magnitude (a dead
  unit, a bf16/fp16 adapter, an imported adapter) would make ``g·u / m`` a 0/0: the
  forward uses ``m`` clamped to ``|m| ≥ 1e-19`` (:data:`MIN_MAGNITUDE`, a change of
  ``y`` far below float32 rounding), so ``g·u`` keeps ``u`` in float32/bfloat16's
  exponent range and every gradient stays finite; the clamp is straight-through for
  ``∇m``, which is exact up to rounding with or without a bias. Layers computing in float16 (whose exponent range is
  too small for that) and layers with adapter dropout active (``u`` is not a function
  of the kept buffer there) run ``"factored"``. Where the stored kernel is frozen (not
  differentiated, not a dequantized copy), ``g`` goes on the ``[I, O]`` and ``[r, O]``
  matrices instead of a ``[tokens, O]`` cotangent: ``∇x = ∇y (g ⊙ (W0 + s·A B))ᵀ`` (one
  matmul; the module's own ``x W0`` gets no cotangent), ``∇B = s·(hᵀ∇y) ⊙ g``,
  ``∇A = xᵀ(∇y (s·B ⊙ g)ᵀ)`` with ``h = x A``; otherwise ``g ⊙ ∇y`` goes to the module's
  own backward. On the ``tiny`` benchmark step (4 layers, 7 projections, r=16, CPU) the
  XLA temporary memory is 1.094x LoRA's (228.8 vs 209.2 MB): 14 MiB of it is ``y`` of
  ``q/k/o/down_proj`` stacked over the layers for ``∇m`` (their next op keeps no
  ``[tokens, O]`` buffer), 2 MiB a second copy of ``v_proj``'s ``y`` (the attention keeps it
  reshaped to heads, a separate ``scan`` residual).
- ``"factored"``: the same forward, differentiated by autodiff (keeps ``u``).
- ``"merged"``: materializes ``W'`` and runs the module on it (the reference; handled by
  the front-ends).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dora_jax import core
from dora_jax.projection import Projection

Array = jax.Array
_F32 = jnp.float32

MIN_MAGNITUDE = 1e-19
"""Smallest ``|m|`` the lean path's forward uses (see the module docstring)."""

PATHS = ("custom_vjp", "factored", "merged")
"""How DoRA layers run in training; see the module docstring."""

DEFAULT_PATH = "custom_vjp"


def init_magnitude(w_mat: Array, a: Array, b: Array, scale: float,
                   w0_norm_sq: Array | None = None) -> Array:
  """``m₀ = ||W0 + s·A B||_c`` ``[O]`` float32 (``= ||W0||_c`` when ``B = 0``).

  The same computation as the forward's norm (:func:`direction_norm`), so ``g = m/n``
  is exactly 1 at init with float32 adapters.
  """
  return core.factored_column_norm(w_mat, a, b, scale, w0_norm_sq)


def direction_norm(w_mat: Array, a: Array, b: Array, scale: float,
                   w0_norm_sq: Array | None = None) -> Array:
  """Detached ``||W0 + s·A B||_c`` ``[O]`` float32, no ``[I, O]`` temporary, no float32 copy of ``W0``."""
  return jax.lax.stop_gradient(core.factored_column_norm(w_mat, a, b, scale, w0_norm_sq))


def _combine(y0: Array, base: Array, low: Array, g: Array) -> Array:
  """``y0 + (g − 1)·base + g·low`` in float32: the one DoRA output formula of every path.

  ``base = x W0``. Where ``|g| < 1/2`` it is evaluated as ``g·(base + low) + (y0 − base)``
  instead: the same value, but ``y − b`` keeps ``g·u`` when ``g`` is tiny (``(g − 1)``
  would round to ``−1`` and cancel it), which the lean backward divides by ``m``.
  """
  y0 = y0.astype(_F32)
  near_one = y0 + (g - 1.0) * base + g * low
  small = g * (base + low) + (y0 - base)
  return jnp.where(jnp.abs(g) < 0.5, small, near_one)


def output(
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
    path: str = DEFAULT_PATH,
    w0_norm_sq: Array | None = None,
    w_is_stored: bool = False,
) -> Array:
  """The adapted output from the base output, without forming ``W'``.

  Args:
    proj: how the layer contracts its input with the kernel matrix.
    y0: the base module's output ``x W0 + b`` (its dtype is the compute dtype).
    x_in: the adapter's input: ``drop(x)`` when ``dropped``, else ``x``.
    w_mat: the base kernel as ``[I, O]`` (dequantized for a quantized base).
    a: ``[I, r]``. b: ``[r, O]``. scale: ``s`` (the variant's factors).
    magnitude: DoRA's ``m [O]``; ``None`` for the plain variant (LoRA, VeRA).
    bias: the module's bias (DoRA without dropout: ``x W0 = y0 − b``).
    dropped: whether ``x_in`` is a dropped-out input; DoRA then computes
      ``drop(x) W0`` with one more matmul, as PEFT does.
    path: ``"custom_vjp"`` or ``"factored"`` (see :data:`PATHS`). Without a magnitude
      (LoRA, VeRA), ``"custom_vjp"`` runs :func:`_plain` (the written-out backward) on
      einsum projections and ``"factored"`` autodiff.
    w0_norm_sq: optional cached ``||W0||²_c`` ``[O]`` float32.
    w_is_stored: ``w_mat`` is the module's stored kernel (a reshape of the parameter,
      not a dequantized or transposed copy), so the lean backward may keep it: where it
      is also frozen (not differentiated), ``∇x`` is one matmul with ``g ⊙ (W0 + s·A B)``
      and no ``[tokens, O]`` cotangent ``g ⊙ ∇y`` is formed.

  Returns:
    ``y0 + s·(x_in A) B`` (no magnitude) or the DoRA output, in ``y0``'s dtype.

  Raises:
    ValueError: for an unknown path.
  """
  if path not in ("factored", "custom_vjp"):
    raise ValueError(f"DoRA output path must be 'factored' or 'custom_vjp', got {path!r}.")
  dt = y0.dtype
  if magnitude is None:
    if path == "custom_vjp" and proj.keeps_free_axes:
      return _plain(proj, float(scale), y0, x_in.astype(dt), a, b)
    b_s = _scaled(b, scale)  # on B [r, O], not on the [tokens, O] output: no extra pass over it
    return (y0.astype(_F32) + proj.low_rank(x_in, a, b_s, dt)).astype(dt)
  norm = direction_norm(w_mat, a, b, scale, w0_norm_sq)
  bias_b = None if bias is None else proj.output_bias(bias)
  if path == "custom_vjp" and not dropped and proj.keeps_free_axes and dt != jnp.float16:
    # Cast outside the custom_vjp, so autodiff maps dx back to x's dtype.
    return _lean(proj, float(scale), y0, x_in.astype(dt), w_mat if w_is_stored else None, a, b,
                 magnitude, norm, bias_b)
  low = scale * proj.low_rank(x_in, a, b, dt)
  g = proj.per_output(core.dora_column_scale(magnitude, norm))
  if dropped:
    base = proj.base(x_in, w_mat, dt)
  else:
    base = y0.astype(_F32) if bias_b is None else y0.astype(_F32) - bias_b.astype(_F32)
  return _combine(y0, base, low, g).astype(dt)


# ---------------------------------------------------------------------------
# The plain low-rank update (LoRA, VeRA): y = y0 + s·(x A) B


def _scaled(b: Array, scale: float) -> Array:
  return b if scale == 1.0 else b * jnp.asarray(scale, b.dtype)


def _plain_forward(proj, scale, y0, x, a, b):
  dt = y0.dtype
  h = proj.down(x, a, dt)
  return (y0.astype(_F32) + proj.up(h, _scaled(b, scale), dt)).astype(dt), h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _plain(proj, scale, y0, x, a, b):
  """``y0 + s·(x A) B`` with the backward written out (the default ``"custom_vjp"`` path).

  The same products autodiff forms, each weight gradient in an orientation XLA:CPU runs
  without copying a ``[tokens, ·]`` operand: ``∇B = s·hᵀ·∇y`` ``[r, O]`` straight into
  ``B``'s layout and ``∇A = (∇hᵀ·x)ᵀ`` (:meth:`Projection.down_weight_grad`: the product
  reads ``x`` in place, then the small ``[r, I]`` result is transposed). Autodiff's
  transpose rules fold those transposes into the products, which XLA:CPU ran as slower
  dots with ``[16, tokens]`` copies of ``h``: the whole LoRA training step of the ``tiny``
  benchmark was 16–22 % slower (``bench/results/cpu-2026-12-01-lora.jsonl``).
  Residuals: ``x`` (the base matmul's input) and ``h = x A`` ``[*free, r]``.
  """
  return _plain_forward(proj, scale, y0, x, a, b)[0]


def _plain_fwd(proj, scale, y0, x, a, b):
  y, h = _plain_forward(proj, scale, y0, x, a, b)
  return y, (x, h, a, b)


def _plain_bwd(proj, scale, res, dy):
  x, h, a, b = res
  dh, db_s = proj.up_transpose(dy, h, _scaled(b, scale))
  dx, da = proj.down_transpose(dh, x, a)
  db = db_s if scale == 1.0 else db_s * scale
  return dy, dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_plain.defvjp(_plain_fwd, _plain_bwd)


# ---------------------------------------------------------------------------
# The lean path: a backward that keeps y, not u


def _clamped(magnitude: Array) -> Array:
  m32 = magnitude.astype(_F32)
  return jnp.where(jnp.abs(m32) < MIN_MAGNITUDE, jnp.where(m32 < 0, -MIN_MAGNITUDE, MIN_MAGNITUDE), m32)


def _lean_forward(proj, scale, y0, x, a, b, magnitude, norm, bias_b):
  """``(y, g·u, h, g)``; ``g·u = y − b`` is ``y`` itself for a layer without a bias."""
  dt = y0.dtype
  h = proj.down(x, a, dt)
  low = scale * proj.up(h, b, dt)
  g = proj.per_output(core.dora_column_scale(_clamped(magnitude), norm))
  base = y0.astype(_F32) if bias_b is None else y0.astype(_F32) - bias_b.astype(_F32)
  y = _combine(y0, base, low, g).astype(dt)
  # With a bias, y − b would lose g·u to rounding where |g·u| ≪ |b| (a magnitude near 0):
  # keep g·u itself for ∇m instead.
  gu = y if bias_b is None else (g * (base + low)).astype(dt)
  return y, gu, h, g


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lean(proj, scale, y0, x, w0, a, b, magnitude, norm, bias_b):
  """The lean DoRA layer; ``w0`` is the stored ``[I, O]`` kernel, or ``None`` (see :func:`output`)."""
  del w0
  return _lean_forward(proj, scale, y0, x, a, b, magnitude, norm, bias_b)[0]


def _lean_fwd(proj, scale, y0, x, w0, a, b, magnitude, norm, bias_b):
  # symbolic_zeros: every array leaf comes as CustomVJPPrimal(value, perturbed).
  perturbed = lambda t: t is not None and t.perturbed
  base_frozen = w0 is not None and not perturbed(w0) and not perturbed(bias_b)
  y0, x, w0, a, b, magnitude, norm, bias_b = jax.custom_derivatives.custom_vjp_primal_tree_values(
      (y0, x, w0, a, b, magnitude, norm, bias_b))
  y, gu, h, g = _lean_forward(proj, scale, y0, x, a, b, magnitude, norm, bias_b)
  # Residuals: g·u (= y without a bias: the next op usually keeps it too), x (the base
  # matmul keeps it), h = xA [*free, r] and small vectors; W0 itself only where it is the
  # stored, frozen kernel (free to keep). Not u, not a dequantized W0 (a copy).
  return y, (gu, x, w0 if base_frozen else None, h, a, b, magnitude, norm, g, bias_b)


def _lean_bwd(proj, scale, res, dy):
  gu, x, w0, h, a, b, magnitude, norm, g, bias_b = res
  dt = gu.dtype
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    dy = jnp.zeros(dy.shape, dy.dtype)
  dy32 = dy.astype(_F32)
  dm = proj.per_output_sum(dy32 * gu.astype(_F32)) / _clamped(magnitude)
  dnorm = jnp.zeros_like(norm)
  tokens = dy.size // proj.o_dim
  if w0 is not None and tokens >= proj.i_dim:
    # A frozen stored kernel and at least as many tokens as inputs: g goes on the [I, O] /
    # [r, O] matrices, not on a [tokens, O] cotangent. ∇x = ∇y (g ⊙ (W0 + s·A B))ᵀ in one
    # matmul (the module's own x W0 gets no cotangent: y0 returns None),
    # ∇B = s·(hᵀ ∇y) ⊙ g, ∇A = xᵀ(∇y (s·B ⊙ g)ᵀ). With fewer tokens than inputs the
    # [tokens, O] cotangent below is the smaller temporary.
    g_o = proj.per_output_sum(g)  # g is y's broadcast of [O]: back to [O]
    # A data dependence on this layer's cotangent (a product with 0 XLA keeps for floats):
    # without it XLA may form every layer's [I, O] temporary at the start of an unrolled
    # backward, all alive at once (an optimization barrier is gone before scheduling).
    g_o = g_o + 0.0 * dy32.reshape(-1)[0]
    gs = (scale * g_o).astype(_F32)
    dh, hdy = proj.up_transpose(dy.astype(dt), h, (b.astype(_F32) * gs).astype(dt))
    w_adapted = (w0.astype(_F32) + core.lora_delta(a, b, scale)) * g_o
    dx = proj.base_transpose(dy.astype(dt), w_adapted)
    da = proj.down_transpose(dh, x, a)[1]
    return (None, dx.astype(x.dtype), None, da.astype(a.dtype), (hdy * gs).astype(b.dtype),
            dm.astype(magnitude.dtype), dnorm, None)
  dyg = (g * dy32).astype(dt)  # y0's cotangent; the low-rank part reuses it (s on B, not on dyg)
  dh, db_s = proj.up_transpose(dyg, h, _scaled(b, scale))
  db = db_s if scale == 1.0 else db_s * scale
  dx, da = proj.down_transpose(dh, x, a)
  dbias = None
  if bias_b is not None:  # y depends on b explicitly through −(g − 1)·b
    axes = tuple(i for i, n in enumerate(bias_b.shape) if n == 1)
    dbias = jnp.sum(dy32 * (1.0 - g), axis=axes, keepdims=True).astype(bias_b.dtype)
  return (dyg, dx.astype(x.dtype), None, da.astype(a.dtype), db.astype(b.dtype),
          dm.astype(magnitude.dtype), dnorm, dbias)


_lean.defvjp(_lean_fwd, _lean_bwd, symbolic_zeros=True)
