"""VeRA (Kopiczko et al., ICLR 2024) and, with ``use_dora``, DVoRA (DoRA paper §5).

One pair of frozen random projections for the whole model, ``vera_A: [I_max, r]`` and
``vera_B: [r, O_max]`` (our ``[in, out]`` layout; PEFT stores the transposes), sized for
the largest adapted layer and sliced per layer; trainable per layer
``vera_lambda_d: [r]`` (init ``d_initial``) and ``vera_lambda_b: [O]`` (init 0)::

    ΔW = A[:I] diag(λ_d) B[:, :O] diag(λ_b)        y = y0 + ((drop(x) A ⊙ λ_d) B) ⊙ λ_b

as PEFT's ``tuners/vera/layer.py`` (``Linear.forward``), so the factors are
``(A[:I] ⊙ λ_d, B[:, :O] ⊙ λ_b, 1)``. The projections are drawn from
``projection_prng_key`` with PEFT's Kaiming-uniform (``a=sqrt(5)``: bound
``1/sqrt(fan_in)``, fan-in ``I_max`` for ``A`` and ``r`` for ``B``); JAX's generator is not
torch's, so the values differ from PEFT's for the same seed — they travel with the
adapter (``save_projection=True``), as in PEFT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dora_jax.variants.base import LeafSpec, Variant

PROJECTION_A = "vera_A"
PROJECTION_B = "vera_B"


def init_shared(i_max: int, o_max: int, config) -> dict[str, jax.Array]:
  """``{"vera_A": [I_max, r], "vera_B": [r, O_max]}`` float32 from ``config.projection_prng_key``."""
  ka, kb = jax.random.split(jax.random.key(config.projection_prng_key))
  r = config.r
  bound_a, bound_b = 1.0 / jnp.sqrt(i_max), 1.0 / jnp.sqrt(r)
  return {PROJECTION_A: jax.random.uniform(ka, (i_max, r), jnp.float32, -bound_a, bound_a),
          PROJECTION_B: jax.random.uniform(kb, (r, o_max), jnp.float32, -bound_b, bound_b)}


def init(key, i_dim: int, o_dim: int, config, shared) -> dict[str, jax.Array]:
  """``{"vera_lambda_d": [r] = d_initial, "vera_lambda_b": [O] = 0}`` in ``config.adapter_dtype``.

  Raises:
    ValueError: if the shared projections are smaller than this layer.
  """
  del key
  a, b = shared[PROJECTION_A], shared[PROJECTION_B]
  if a.shape[0] < i_dim or b.shape[1] < o_dim or a.shape[1] != config.r:
    raise ValueError(
        f"VeRA projections vera_A {a.shape}, vera_B {b.shape} do not cover a layer of"
        f" {i_dim} x {o_dim} with r={config.r}: they must be [>= I, r] and [r, >= O].")
  dtype = config.adapter_dtype
  return {"vera_lambda_d": jnp.full((config.r,), config.d_initial, dtype),
          "vera_lambda_b": jnp.zeros((o_dim,), dtype)}


def factors(leaves, shared, i_dim: int, o_dim: int, config):
  """``(A[:I] ⊙ λ_d [I, r], B[:, :O] ⊙ λ_b [r, O], 1.0)``.

  Raises:
    ValueError: if the shared projections are missing or too small for this layer.
  """
  del config
  if PROJECTION_A not in shared or PROJECTION_B not in shared:
    raise ValueError("VeRA adapters need the shared projections (adapters['shared'] with"
                     " vera_A and vera_B); they are missing.")
  a, b = shared[PROJECTION_A], shared[PROJECTION_B]
  if a.shape[0] < i_dim or b.shape[1] < o_dim:
    raise ValueError(f"VeRA projections vera_A {a.shape}, vera_B {b.shape} are smaller than a"
                     f" layer of {i_dim} x {o_dim}: they were made for another model.")
  lam_d, lam_b = leaves["vera_lambda_d"], leaves["vera_lambda_b"]
  a_eff = a[:i_dim].astype(lam_d.dtype) * lam_d[None, :]
  b_eff = b[:, :o_dim].astype(lam_b.dtype) * lam_b[None, :]
  return a_eff, b_eff, 1.0


VARIANT = Variant(
    name="vera",
    leaves={"vera_lambda_b": LeafSpec(("out",)), "vera_lambda_d": LeafSpec(("rank",))},
    init=init,
    factors=factors,
    shared={PROJECTION_A: LeafSpec(("in", "rank"), trainable=False, decay=False),
            PROJECTION_B: LeafSpec(("rank", "out"), trainable=False, decay=False)},
    init_shared=init_shared,
)
