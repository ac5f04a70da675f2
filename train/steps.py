"""The pure pieces of training: loss, optimizer, the jitted train and eval steps.

Methods share one shape: a *frozen* tree (the base params, or nothing for full
fine-tuning) and a *trainable* tree (the adapters, or the params). The step
differentiates the trainable tree only.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dora_jax

Array = jax.Array
Batch = Mapping[str, Array]

MODEL_INPUTS = ("attention_mask", "positions", "segment_ids", "logits_at")


def token_nll(logits: Array, targets: Array, mask: Array, axis: int | None = None) -> tuple[Array, Array]:
  """Masked next-token negative log-likelihood (``optax.softmax_cross_entropy_with_integer_labels``).

  Args:
    logits: ``[B, T, V]`` (any float dtype; computed in float32).
    targets: ``[B, T]`` int, the token each position predicts.
    mask: ``[B, T]``, 1 where the position counts.
    axis: sum over this axis only (``-1``: per row), or over everything (``None``).

  Returns:
    ``(sum of nll over masked positions, number of masked positions)``.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets.astype(jnp.int32))
  mask = mask.astype(jnp.float32)
  # where, not a product: padded rows may hold non-finite logits.
  return jnp.sum(jnp.where(mask > 0, nll, 0.0), axis=axis), jnp.sum(mask, axis=axis)


def loss_positions(loss_mask: np.ndarray, k: int) -> np.ndarray:
  """``[B, K]`` positions holding each row's loss tokens first (then unmasked filler).

  With ``logits_at`` the model computes the LM head at these ``K`` positions only.
  """
  order = np.argsort(-(loss_mask > 0).astype(np.int8), axis=1, kind="stable")
  return order[:, :k].astype(np.int32)


def at_loss_positions(batch: Batch) -> tuple[Array, Array]:
  """``(targets, loss_mask)`` gathered at ``batch["logits_at"]`` when present."""
  if "logits_at" not in batch:
    return batch["targets"], batch["loss_mask"]
  idx = batch["logits_at"].astype(jnp.int32)
  return (jnp.take_along_axis(batch["targets"], idx, axis=1),
          jnp.take_along_axis(batch["loss_mask"], idx, axis=1))


def make_forward(model, method: str, lora_config: Any = None) -> Callable:
  """``forward(frozen, trainable, batch, rng, train) -> logits [B, T, V]``.

  ``frozen`` is ``{}`` for full fine-tuning (``trainable`` holds every param); for the adapter
  methods it is ``{"params": base params, "base_norms": cached ||W0||²_c or None}``
  (:func:`frozen_inputs`): the cached norms (:func:`dora_jax.linen.base_norms`) skip a pass over
  every ``W0`` per step and make DoRA's ``g = m / ||W0||_c`` exactly 1 at init.
  """
  wrapped = dora_jax.wrap(model.apply, lora_config) if method != "full" else None
  use_dropout = lora_config is not None and lora_config.adapter_dropout > 0

  def forward(frozen, trainable, batch, rng, train: bool):
    kwargs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    rngs = {"dropout": rng} if (train and use_dropout) else None
    if wrapped is None:
      return model.apply({"params": trainable}, batch["input_ids"], **kwargs)
    return wrapped(frozen["params"], trainable, batch["input_ids"], rngs=rngs,
                   base_norms=frozen.get("base_norms"), **kwargs)

  return forward


def frozen_inputs(params: Any, base_norms: Any = None) -> dict[str, Any]:
  """The ``frozen`` argument of :func:`make_forward`'s ``forward`` for an adapter method."""
  return {"params": params, "base_norms": base_norms}


def make_optimizer(
    *, learning_rate: float, steps: int, warmup_steps: int, min_lr_ratio: float,
    weight_decay: float, grad_clip: float, method: str, loraplus_lr_ratio: float = 0.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay, global-norm clipping.

  Weight decay applies to ``lora_a``/``lora_b`` and VeRA's vectors (adapters) or to
  matrices (full fine-tuning); never to DoRA magnitudes, norms or biases. For vera/dvora
  the shared projections ``vera_A``/``vera_B`` travel in the trainable tree but are frozen
  (:func:`dora_jax.freeze_base`: zero updates, no optimizer state).

  ``loraplus_lr_ratio > 0`` (adapter methods): LoRA+ (:func:`dora_jax.loraplus`, PEFT's
  ``create_loraplus_optimizer`` groups): ``lora_b`` and the one-axis leaves (magnitudes, VeRA's
  vectors) learn at ``ratio ×`` the schedule, adapters on ``embed_tokens`` at PEFT's
  ``loraplus_lr_embedding`` (1e-6); the returned schedule is ``lora_a``'s.

  Raises:
    ValueError: ``loraplus_lr_ratio`` with ``method="full"``, or a negative ratio.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=min(warmup_steps, max(steps - 1, 0)),
      decay_steps=max(steps, 1), end_value=learning_rate * min_lr_ratio)
  if method == "full":
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
  else:
    decay_mask = dora_jax.weight_decay_mask
  if loraplus_lr_ratio < 0 or (loraplus_lr_ratio and method == "full"):
    raise ValueError(f"loraplus_lr_ratio={loraplus_lr_ratio} needs an adapter method and a ratio > 0"
                     " (0 = off).")
  adamw = lambda lr: optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask)
  parts = []
  if grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  if loraplus_lr_ratio:  # its partition freezes VeRA's projections too
    parts.append(dora_jax.loraplus(adamw, schedule, loraplus_lr_ratio=loraplus_lr_ratio,
                                   embedding_modules=("embed_tokens",)))
    return optax.chain(*parts), schedule
  parts.append(adamw(schedule))
  tx = optax.chain(*parts)
  if method in ("vera", "dvora"):
    tx = dora_jax.freeze_base(tx)
  return tx, schedule


def make_train_step(forward: Callable, tx: optax.GradientTransformation, grad_accum: int = 1,
                    jit_kwargs: Mapping[str, Any] | None = None,
                    opt_state_to_device: Callable | None = None) -> Callable:
  """``step(frozen, trainable, opt_state, batch, rng) -> (trainable, opt_state, metrics)``.

  ``opt_state_to_device``: for an optimizer state kept in host memory
  (:func:`dora_jax.sharding.host_offloaded` in/out shardings), the move to device memory
  that the step applies first (``lambda s: dora_jax.sharding.to_device(s, device_shardings)``).

  The batch's leading axis is split into ``grad_accum`` micro-batches whose
  summed token losses and gradients are accumulated with ``lax.scan``: the
  update equals the one of the whole batch (mean over its response tokens).
  """

  def micro_loss(trainable, frozen, micro, rng):
    logits = forward(frozen, trainable, micro, rng, True)
    return token_nll(logits, *at_loss_positions(micro))

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(frozen, trainable, opt_state, batch, rng):
    if opt_state_to_device is not None:
      opt_state = opt_state_to_device(opt_state)
    if grad_accum == 1:
      (total, count), grads = grad_fn(trainable, frozen, batch, rng)
    else:
      # Micro-batch i takes rows i, i+k, i+2k, ...: each keeps its share of every device's rows,
      # so a batch sharded over (data, fsdp) needs no all-gather.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
      rngs = jax.random.split(rng, grad_accum)

      def body(carry, inp):
        g_acc, t_acc, c_acc = carry
        mb, r = inp
        (t, c), g = grad_fn(trainable, frozen, mb, r)
        return (jax.tree.map(jnp.add, g_acc, g), t_acc + t, c_acc + c), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, total, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, rngs))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": total / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
    return trainable, opt_state, metrics

  return jax.jit(step, donate_argnums=(1, 2), **dict(jit_kwargs or {}))


def make_eval_step(forward: Callable) -> Callable:
  """``eval_step(frozen, trainable, batch) -> (nll per row [B], count per row [B])``."""

  def eval_step(frozen, trainable, batch):
    logits = forward(frozen, trainable, batch, None, False)
    return token_nll(logits, *at_loss_positions(batch), axis=-1)

  return jax.jit(eval_step)


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads every array's leading axis with zero rows up to ``rows`` (fixed jit shapes)."""
  out = {}
  for k, v in batch.items():
    n = v.shape[0]
    out[k] = v if n == rows else np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)])
  return out
