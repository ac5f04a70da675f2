"""LoRA (Hu et al. 2021) and rsLoRA: ``ΔW = s·A B``, ``A: [I, r]``, ``B: [r, O]`` trained.

``s = lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``). Initialization as PEFT's
``LoraLayer.reset_lora_parameters``: ``A`` Kaiming-uniform (``a=sqrt(5)``, bound
``1/sqrt(I)``) or Gaussian (std ``1/r``), ``B`` zeros, so the adapted model starts equal
to the base; or PEFT's other inits (``peft/tuners/lora/layer.py``, 0.21):

- ``"orthogonal"`` (``orthogonal_init``): ``Q`` from the QR of an ``[r, r]`` Gaussian,
  ``A = G1 Q[0::2] / 10``, ``B = Q[1::2]ᵀ G2 / 10`` (``G1 [I, r/2]``, ``G2 [r/2, O]``
  Gaussian): ``A B = 0`` (distinct rows of ``Q`` are orthogonal), the base is unchanged.
- ``"pissa"`` (Meng et al. 2024, ``pissa_init``): ``W0 = U S Vᵀ``;
  ``A = U_r sqrt(S_r/s)``, ``B = sqrt(S_r/s) V_rᵀ`` so ``s·A B`` is ``W0``'s top-``r`` part;
  ``"pissa_niter_N"``: the same from a randomized SVD with ``N`` subspace iterations
  (:func:`randomized_svd`, as ``torch.svd_lowrank(W, r, niter=N)``).
- ``"olora"`` (Büyükakyüz 2024, ``olora_init``): ``W0ᵀ = Q R`` (torch's ``[O, I]``
  weight); ``A = R[:r]ᵀ``, ``B = Q[:, :r]ᵀ`` (no division by ``s``, as PEFT).

PiSSA and OLoRA move ``s·A0 B0`` out of the base: the adapter runs on the residual
``W0 − s·A0 B0`` (:func:`init_from_weight`), so the adapted model still starts equal to
the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dora_jax import core
from dora_jax.variants.base import LeafSpec, Variant


def init(key: jax.Array, i_dim: int, o_dim: int, config, shared=None) -> dict[str, jax.Array]:
  """``{"lora_a": [I, r], "lora_b": [r, O]}`` in ``config.adapter_dtype``.

  Raises:
    ValueError: for PiSSA / OLoRA, which need the weight (:func:`init_from_weight`).
  """
  del shared
  ka, kb = jax.random.split(key)
  dtype, r = config.adapter_dtype, config.r
  if config.init_lora_weights == "orthogonal":
    a, b = orthogonal_factors(key, i_dim, o_dim, r)
    return {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}
  if config.modifies_base:
    raise ValueError(
        f"init_lora_weights={config.init_lora_weights!r} changes the base weight (W0 - s·A0 B0):"
        " use dora_jax.init_adapters_and_base(key, params, config), which returns the residual"
        " params with the adapters.")
  if config.init_lora_weights == "gaussian":
    a = core.gaussian_a(ka, (i_dim, r), dtype)
  else:
    a = core.kaiming_uniform_a(ka, (i_dim, r), dtype)
  if config.init_lora_weights is False:
    b = core.kaiming_uniform_a(kb, (r, o_dim), dtype)
  else:
    b = jnp.zeros((r, o_dim), dtype)
  return {"lora_a": a, "lora_b": b}


def orthogonal_factors(key: jax.Array, i_dim: int, o_dim: int, r: int) -> tuple[jax.Array, jax.Array]:
  """PEFT's ``orthogonal_init``: ``(A [I, r], B [r, O])`` float32 with ``A B = 0``.

  Raises:
    ValueError: for an odd ``r`` (PEFT's message).
  """
  if r % 2:
    raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r}.")
  kq, ka, kb = jax.random.split(key, 3)
  q, _ = jnp.linalg.qr(jax.random.normal(kq, (r, r), jnp.float32))
  a = jax.random.normal(ka, (i_dim, r // 2), jnp.float32) @ q[0::2] / 10.0
  b = q[1::2].T @ jax.random.normal(kb, (r // 2, o_dim), jnp.float32) / 10.0
  return a, b


def randomized_svd(key: jax.Array, x: jax.Array, q: int, niter: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(U [I, q], S [q], Vh [q, O])`` with ``x ≈ U diag(S) Vh``: Halko, Martinsson & Tropp
  (2011) Alg. 4.4 (randomized subspace iteration), as ``torch.svd_lowrank(xᵀ, q, niter)``
  computes it for PEFT's ``pissa_niter_N`` (a Gaussian test matrix ``Ω [O, q]``, no
  oversampling, a QR after every product). ``x: [I, O]`` float32.
  """
  omega = jax.random.normal(key, (x.shape[1], q), jnp.float32)
  basis, _ = jnp.linalg.qr(x @ omega)
  for _ in range(niter):
    basis, _ = jnp.linalg.qr(x.T @ basis)
    basis, _ = jnp.linalg.qr(x @ basis)
  u_small, s, vh = jnp.linalg.svd(basis.T @ x, full_matrices=False)
  return basis @ u_small, s, vh


def weight_factors(key: jax.Array, w32: jax.Array, config) -> tuple[jax.Array, jax.Array]:
  """PiSSA / OLoRA factors ``(A [I, r], B [r, O])`` float32 of ``W0 = w32 [I, O]``."""
  init, r, s = config.init_lora_weights, config.r, config.scale
  if init == "olora":
    q, rr = jnp.linalg.qr(w32.T)  # torch's weight [O, I] = Q R
    return rr[:r].T, q[:, :r].T
  if init == "pissa":
    u, sv, vh = jnp.linalg.svd(w32, full_matrices=False)
  else:
    u, sv, vh = randomized_svd(key, w32, r, int(init.rsplit("_", 1)[-1]))
  root = jnp.sqrt(sv[:r] / s)
  return u[:, :r] * root, root[:, None] * vh[:r]


def init_from_weight(key: jax.Array, w_mat: jax.Array, config) -> tuple[dict[str, jax.Array], jax.Array]:
  """``(leaves, W_res)`` for an init that reads ``W0 = w_mat [I, O]`` (PiSSA, OLoRA).

  ``W_res = W0 − s·A B`` in ``w_mat``'s dtype, computed in float32 from ``A``, ``B`` as
  stored (``adapter_dtype``), so ``W_res + s·A B = W0`` up to one rounding of ``W_res``.

  Raises:
    ValueError: a non-float ``W0`` (PEFT: "initialize PiSSA under float32, float16, or
      bfloat16"), or an init that does not read the weight.
  """
  if not config.modifies_base:
    raise ValueError(f"init_lora_weights={config.init_lora_weights!r} does not read the weight.")
  if not jnp.issubdtype(w_mat.dtype, jnp.floating):
    raise ValueError(
        f"init_lora_weights={config.init_lora_weights!r} needs a float base weight, got"
        f" {w_mat.dtype}: initialize on the float model, then quantize the residual params.")
  w32 = w_mat.astype(jnp.float32)
  a, b = weight_factors(key, w32, config)
  a, b = a.astype(config.adapter_dtype), b.astype(config.adapter_dtype)
  w_res = w32 - config.scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
  return {"lora_a": a, "lora_b": b}, w_res.astype(w_mat.dtype)


def factors(leaves, shared, i_dim: int, o_dim: int, config):
  """``(A, B, s)``: the leaves themselves and the config's scale."""
  del shared, i_dim, o_dim
  return leaves["lora_a"], leaves["lora_b"], config.scale


VARIANT = Variant(
    name="lora",
    leaves={"lora_a": LeafSpec(("in", "rank")), "lora_b": LeafSpec(("rank", "out"))},
    init=init,
    factors=factors,
)
