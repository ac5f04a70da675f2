"""optax helpers: freeze the base, decay only what should decay, LoRA+, one jitted step."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

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


LORAPLUS_A = "loraplus_a"
LORAPLUS_B = "loraplus_b"
LORAPLUS_EMBEDDING = "loraplus_embedding"


def _path_names(path) -> list[str]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return out


def loraplus_labels(tree: Any, embedding_modules: Sequence[str] | str = ()) -> Any:
  """LoRA+ groups of each leaf, by PEFT's ``create_loraplus_optimizer`` rule.

  ``"loraplus_embedding"``: trainable leaves of a module in ``embedding_modules``
  (module-name suffixes, or a regex matched in full against the ``/``-joined module path,
  as ``target_modules``); ``"loraplus_b"``: ``lora_b`` and the one-axis leaves (PEFT's
  ``"lora_B" in name or param.ndim == 1``: DoRA's ``magnitude``, VeRA's vectors);
  ``"loraplus_a"``: the other trainable leaves (``lora_a``); ``"frozen"``: the rest.
  Stacked (``nn.scan``) leaves are classed by their per-layer axes.
  """
  specs = {k: s for k, s in variants.leaf_specs().items() if s.trainable}
  if isinstance(embedding_modules, str):
    pattern = re.compile(embedding_modules)
    is_embedding = lambda mod: bool(pattern.fullmatch(mod))
  else:
    names = tuple(embedding_modules)
    is_embedding = lambda mod: any(mod == n or mod.endswith("/" + n) for n in names)

  def label(path, _):
    keys = _path_names(path)
    name = keys[-1] if keys else ""
    if name not in specs:
      return FROZEN
    if is_embedding("/".join(keys[:-1])):
      return LORAPLUS_EMBEDDING
    if name == "lora_b" or len(specs[name].axes) == 1:
      return LORAPLUS_B
    return LORAPLUS_A

  return jax.tree_util.tree_map_with_path(label, tree)


def _times(learning_rate, factor: float):
  if callable(learning_rate):
    return lambda count: factor * learning_rate(count)
  return factor * learning_rate


def loraplus(
    tx_factory: Callable[[Any], optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    *,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float | optax.Schedule = 1e-6,
    embedding_modules: Sequence[str] | str = (),
) -> optax.GradientTransformation:
  """LoRA+ (Hayou et al. 2024, PEFT ``optimizers/loraplus.py``): ``B`` learns ``ratio``× faster.

  ``tx_factory(lr)`` builds the optimizer of each group (e.g.
  ``lambda lr: optax.adamw(lr, weight_decay=0.01, mask=weight_decay_mask)``):
  ``lora_a`` gets ``learning_rate``, ``lora_b`` and the one-axis leaves (``magnitude``,
  as PEFT's ``ndim == 1`` rule) ``learning_rate · loraplus_lr_ratio``, the adapters of
  ``embedding_modules`` ``loraplus_lr_embedding``; frozen leaves get zero updates
  (:func:`loraplus_labels`). A schedule is scaled as a schedule.

  Raises:
    ValueError: for a non-positive ``loraplus_lr_ratio``.

  Example:
    >>> tx = loraplus(optax.adam, 1e-4, loraplus_lr_ratio=16)  # doctest: +SKIP
  """
  if not loraplus_lr_ratio > 0:
    raise ValueError(f"loraplus_lr_ratio must be positive (PEFT suggests >= 1), got {loraplus_lr_ratio!r}.")
  return optax.partition(
      {LORAPLUS_A: tx_factory(learning_rate),
       LORAPLUS_B: tx_factory(_times(learning_rate, float(loraplus_lr_ratio))),
       LORAPLUS_EMBEDDING: tx_factory(loraplus_lr_embedding),
       FROZEN: optax.set_to_zero()},
      lambda tree: loraplus_labels(tree, embedding_modules))


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
