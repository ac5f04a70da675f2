"""optax helpers: freeze the base, decay only what should decay, one jitted step."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from dora_jax import variants

Array = jax.Array

TRAINABLE = "adapter"
FROZEN = "frozen"


def _leaf_name(path) -> str:
  last = path[-1] if path else None
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def _trainable_names() -> frozenset[str]:
  return frozenset(k for k, spec in variants.leaf_specs().items() if spec.trainable)


def adapter_labels(tree: Any) -> Any:
  """Labels each leaf ``"adapter"`` (a trainable leaf of a registered method: ``lora_a``,
  ``lora_b``, ``magnitude``, ``vera_lambda_d`` ...) or ``"frozen"`` (everything else,
  VeRA's shared projections included).

  Works on any tree whose adapter leaves keep their names: an adapters tree,
  params combined with adapters (:func:`dora_jax.combine`), or a
  ``(params, adapters)`` tuple, where the whole first element is frozen.
  """
  names = _trainable_names()
  return jax.tree_util.tree_map_with_path(
      lambda p, _: TRAINABLE if _leaf_name(p) in names else FROZEN, tree)


def trainable_mask(tree: Any) -> Any:
  """``True`` at adapter leaves, ``False`` elsewhere (an optax mask)."""
  return jax.tree_util.tree_map(lambda l: l == TRAINABLE, adapter_labels(tree))


def weight_decay_mask(tree: Any, *, decay_magnitude: bool = False) -> Any:
  """``True`` where weight decay applies: trainable adapter leaves whose method decays them
  (``lora_a``/``lora_b``, VeRA's vectors), and ``magnitude`` only if asked.

  Decaying the DoRA magnitude pulls it towards 0, away from the base norm it
  starts at, so it is excluded by default.

  Example:
    >>> tx = optax.adamw(1e-3, weight_decay=0.01, mask=weight_decay_mask)  # doctest: +SKIP
  """
  keys = {k for k, spec in variants.leaf_specs().items() if spec.trainable and spec.decay}
  if decay_magnitude:
    keys.add(variants.MAGNITUDE)
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in keys, tree)


def freeze_base(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on adapter leaves, zero updates (and no optimizer state) on the rest.

  Lets one optimizer run over a tree that holds base weights and adapters
  together; the base receives exact zeros, so it stays bitwise unchanged.

  Example:
    >>> tx = freeze_base(optax.adam(1e-3))
    >>> state = tx.init({"w": jax.numpy.ones(3), "lora_a": jax.numpy.ones(2)})
  """
  return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, adapter_labels)


def make_train_step(
    loss_fn: Callable[..., tuple[Array, Any] | Array],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable:
  """A jit-compiled step that differentiates the adapters only.

  Args:
    loss_fn: ``loss_fn(params, adapters, batch, rng) -> loss`` (or
      ``(loss, aux)`` with ``has_aux``).
    tx: the optimizer over the adapters tree.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the adapters and optimizer state buffers.

  Returns:
    ``step(params, adapters, opt_state, batch, rng) -> (adapters, opt_state,
    metrics)``, ``metrics`` holding ``loss``, ``grad_norm`` (and ``aux``).
  """

  def step(params, adapters, opt_state, batch, rng):
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=has_aux)
    out, grads = grad_fn(params, adapters, batch, rng)
    loss, aux = (out if has_aux else (out, None))
    updates, opt_state = tx.update(grads, opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if has_aux:
      metrics["aux"] = aux
    return adapters, opt_state, metrics

  return jax.jit(step, donate_argnums=(1, 2) if donate else ())
