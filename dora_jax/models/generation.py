"""KV-cached text generation for :class:`~dora_jax.models.llama.Llama` (every family it runs).

One jitted function per (model, adapter config, shapes, sampling settings) runs the
whole generation: a prefill of the left-padded prompts ``[B, P]`` that writes the
``"cache"`` collection (keys and values ``[B, S, K, hd]`` per layer, ``S = P + N``),
then up to ``N - 1`` one-token steps in a ``lax.while_loop`` that stops when every
row has produced an end-of-sequence token. Shapes never change inside, so nothing
recompiles per generated token.

Adapters run unmerged through :func:`dora_jax.wrap` (the cache is just another Flax
collection: ``apply({"params": p, "cache": c}, adapters, ..., mutable=["cache"])``);
merged or plain params run the model directly.

Left padding: a row's prompt ends at the last column, its real tokens get positions
``0..n-1`` (``cumsum(mask) - 1``, as transformers' ``generate``), padding slots are
masked out of every attention, so a row's tokens do not depend on the padding
around it. Sampling follows transformers' logits warpers in their order:
temperature, then top-k, then top-p (nucleus: the smallest set of tokens whose
probability reaches ``top_p``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class GenerateOutput(NamedTuple):
  """What :func:`generate` returns.

  Attributes:
    tokens: ``[B, N]`` int32, the generated tokens; after a row's end-of-sequence token
      (which is kept) the row holds ``pad_token_id``.
    lengths: ``[B]`` int32, generated tokens per row, end-of-sequence token included.
    logits: ``[B, N, V]`` float32, the logits each token was chosen from (with
      ``return_logits``; rows past their end hold whatever the model gave), else None.
  """

  tokens: Array
  lengths: Array
  logits: Array | None = None


def init_cache(model: nn.Module, batch_size: int, max_length: int) -> Any:
  """An all-zero KV cache (the ``"cache"`` collection) for ``batch_size`` rows of
  ``max_length`` slots: per attention layer ``cached_key`` / ``cached_value``
  ``[B, S, K, hd]`` in the model's compute dtype (``[L, B, S, K, hd]`` with ``scan_layers``).
  Shapes come from ``jax.eval_shape`` of ``model.init``: no parameter is materialized."""
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), ids, attention_mask=jnp.ones_like(ids), cache_index=jnp.int32(0)))
  if "cache" not in shapes:
    raise ValueError(f"{type(model).__name__}.init(..., cache_index=0) made no 'cache' collection:"
                     " the model does not support KV-cached decoding.")
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, multiple: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token lists → left-padded ``(input_ids [B, P], attention_mask [B, P])`` int32, ``P`` the
  longest length rounded up to ``multiple`` (fewer distinct shapes, fewer compilations).

  Raises:
    ValueError: no sequences, or an empty one.
  """
  if not sequences or any(len(s) == 0 for s in sequences):
    raise ValueError("left_pad needs at least one sequence and no empty ones.")
  p = max(len(s) for s in sequences)
  p = -(-p // multiple) * multiple
  ids = np.full((len(sequences), p), pad_token_id, np.int32)
  mask = np.zeros((len(sequences), p), np.int32)
  for i, s in enumerate(sequences):
    ids[i, p - len(s):] = np.asarray(s, np.int32)
    mask[i, p - len(s):] = 1
  return ids, mask


def sample_logits(logits: Array, rng: Array, temperature: float | Array = 0.0, top_k: int | Array = 0,
                  top_p: float | Array = 1.0) -> Array:
  """Next tokens ``[B]`` int32 from ``logits [B, V]``.

  ``temperature == 0``: argmax (greedy). Else ``logits / temperature``, keep the ``top_k``
  largest (0 = all), keep the smallest set whose softmax mass reaches ``top_p`` (1 = all;
  the most likely token is always kept), and draw from the rest with ``rng``. The order and
  the cut-offs are those of transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper``
  and ``TopPLogitsWarper`` (ties at a cut-off are kept). The settings may be traced values
  (one compilation serves them all: a ``lax.cond`` picks greedy or sampling).
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return greedy
  v = logits.shape[-1]

  def draw(_):
    scaled = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
    kth = jax.lax.dynamic_index_in_dim(desc, k - 1, axis=1)  # [B, 1]
    in_k = jnp.arange(v) < k
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)  # top-p sees the top-k only
    keep = in_k & (jnp.cumsum(probs, axis=-1) - probs < top_p)  # always keeps the first
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    kept = (scaled >= kth) & (scaled >= cutoff)
    return jax.random.categorical(rng, jnp.where(kept, scaled, -jnp.inf), axis=-1).astype(jnp.int32)

  return jax.lax.cond(jnp.asarray(temperature) > 0, draw, lambda _: greedy, None)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {top_k}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {top_p}.")


@functools.lru_cache(maxsize=32)
def make_generate_fn(model: nn.Module, lora_config: Any = None, *, dora_path: str = "factored",
                     use_cache: bool = True):
  """The jitted generation function for ``model`` (and adapters made with ``lora_config``).

  Returns ``run(params, adapters, base_norms, input_ids [B, P], attention_mask [B, P], rng,
  temperature, top_k, top_p, eos_ids [MAX_EOS_IDS] (-1 padded), pad_token_id, *, max_new_tokens,
  return_logits) -> GenerateOutput``; only the keyword arguments are static (each value compiles
  once).
  ``adapters`` / ``base_norms`` are None without ``lora_config``. ``use_cache=False`` recomputes
  the whole ``[B, P + N]`` sequence for every token instead (the reference the cache is measured
  against; same shapes every step, so it compiles once too). Cached per arguments.
  """
  if getattr(model, "remat", "none") != "none":
    model = model.clone(remat="none")  # nothing to differentiate
  if lora_config is None:
    apply = lambda variables, adapters, norms, *a, **kw: model.apply(variables, *a, **kw)
  else:
    from dora_jax.linen import wrap  # pylint: disable=g-import-not-at-top
    wrapped = wrap(model.apply, lora_config, dora_path=dora_path)
    apply = lambda variables, adapters, norms, *a, **kw: wrapped(variables, adapters, *a, base_norms=norms, **kw)

  def run(params, adapters, base_norms, input_ids, attention_mask, rng, temperature, top_k, top_p,
          eos, pad_token_id, *, max_new_tokens: int, return_logits: bool):
    b, p = input_ids.shape
    n = max_new_tokens
    mask = attention_mask.astype(jnp.int32)
    kv_mask = jnp.concatenate([mask, jnp.ones((b, n), jnp.int32)], axis=1)  # [B, S]
    prompt_pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    next_pos = jnp.sum(mask, axis=1)  # position of the first generated token
    last = jnp.full((b, 1), p - 1, jnp.int32)

    if use_cache:
      state0 = init_cache(model, b, p + n)

      def forward(state, ids, positions, slot, logits_at=None):
        out, mutated = apply({"params": params, "cache": state}, adapters, base_norms, ids,
                             attention_mask=kv_mask, positions=positions, logits_at=logits_at,
                             cache_index=slot, mutable=["cache"])
        return out[:, -1], mutated["cache"]

      logits, state = forward(state0, input_ids, prompt_pos, jnp.int32(0), last)
    else:
      all_pos = jnp.concatenate([prompt_pos, next_pos[:, None] + jnp.arange(n)[None]], axis=1)
      state0 = jnp.concatenate([input_ids.astype(jnp.int32), jnp.full((b, n), pad_token_id, jnp.int32)], 1)

      def forward(state, ids, positions, slot):
        del positions
        state = jax.lax.dynamic_update_slice(state, ids.astype(jnp.int32), (0, slot))
        out = apply({"params": params}, adapters, base_norms, state, attention_mask=kv_mask,
                    positions=all_pos, logits_at=jnp.full((b, 1), slot, jnp.int32))
        return out[:, -1], state

      state = state0
      logits = apply({"params": params}, adapters, base_norms, state0, attention_mask=kv_mask,
                     positions=all_pos, logits_at=last)[:, -1]

    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = sample(logits, jax.random.fold_in(rng, 0))
    tokens = jnp.full((b, n), pad_token_id, jnp.int32).at[:, 0].set(tok)
    all_logits = (jnp.zeros((b, n, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
                  if return_logits else None)
    done = jnp.isin(tok, eos)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(carry):
      i, _, done, *_ = carry
      return (i < n) & ~jnp.all(done)

    def body(carry):
      i, tok, done, lengths, tokens, all_logits, state = carry
      slot = p + i - 1
      logits, state = forward(state, tok[:, None], (next_pos + i - 1)[:, None], slot)
      new = sample(logits, jax.random.fold_in(rng, i))
      out = jnp.where(done, pad_token_id, new)
      tokens = jax.lax.dynamic_update_slice(tokens, out[:, None], (0, i))
      if all_logits is not None:
        all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None], (0, i, 0))
      lengths = lengths + (~done).astype(jnp.int32)
      done = done | jnp.isin(new, eos)
      return i + 1, out, done, lengths, tokens, all_logits, state

    carry = (jnp.int32(1), tok, done, lengths, tokens, all_logits, state)
    _, _, _, lengths, tokens, all_logits, _ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens, lengths, all_logits)

  return jax.jit(run, static_argnames=("max_new_tokens", "return_logits"))


MAX_EOS_IDS = 8
"""End-of-sequence ids one call accepts (they travel as a ``-1``-padded array: no recompilation)."""


def _eos_array(eos_token_id) -> np.ndarray:
  if eos_token_id is None:
    ids = []
  elif isinstance(eos_token_id, (int, np.integer)):
    ids = [int(eos_token_id)]
  else:
    ids = [int(e) for e in eos_token_id]
  if len(ids) > MAX_EOS_IDS or any(i < 0 for i in ids):
    raise ValueError(f"eos_token_id: at most {MAX_EOS_IDS} non-negative ids, got {ids}.")
  return np.array(ids + [-1] * (MAX_EOS_IDS - len(ids)), np.int32)


def generate(model: nn.Module, params: Any, input_ids: Any, attention_mask: Any = None, *,
             max_new_tokens: int, adapters: Any = None, lora_config: Any = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | Array = 0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             use_cache: bool = True, return_logits: bool = False, dora_path: str = "factored",
             base_norms: Any = None) -> GenerateOutput:
  """Generates up to ``max_new_tokens`` tokens after each left-padded prompt.

  Args:
    model: a :class:`~dora_jax.models.llama.Llama` (any Linen LM whose ``__call__`` takes
      ``attention_mask, positions, logits_at, cache_index`` the same way).
    params: the base params (or merged ones), plain nested dicts of arrays.
    input_ids: ``[B, P]`` int, left-padded (see :func:`left_pad`).
    attention_mask: ``[B, P]``, 1 = token, 0 = padding (default all ones).
    max_new_tokens: ``N``; the cache holds ``P + N`` slots.
    adapters, lora_config: run the adapters unmerged through :func:`dora_jax.wrap`
      (both or neither).
    temperature, top_k, top_p: sampling (``temperature=0``: greedy).
    seed: an int or a PRNG key; the same seed gives the same tokens.
    eos_token_id: one id or several (e.g. ``<|im_end|>`` and ``<|endoftext|>``); a row stops
      after producing one; generation stops when every row has.
    pad_token_id: fills rows after their end.
    use_cache: False recomputes the full sequence per token (for comparisons).
    return_logits: also return ``[B, N, V]`` logits.
    dora_path: :func:`dora_jax.wrap`'s.
    base_norms: :func:`dora_jax.linen.base_norms` of DoRA adapters (saves their
      ``||W0||²`` per step).

  Returns:
    :class:`GenerateOutput`.

  Raises:
    ValueError: right padding or an all-padding row, adapters without a config (or the
      reverse), or bad sampling settings.
  """
  _check_sampling(max_new_tokens, temperature, top_k, top_p)
  if (adapters is None) != (lora_config is None):
    raise ValueError("Pass adapters and lora_config together (or neither, for plain or merged params).")
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, P], got shape {ids.shape}.")
  mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask {mask.shape} must have input_ids' shape {ids.shape}.")
  if not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
    raise ValueError("Prompts must be left-padded (padding first, the last column a real token);"
                     " build them with dora_jax.models.generation.left_pad.")
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  rng = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  fn = make_generate_fn(model, lora_config, dora_path=dora_path, use_cache=use_cache)
  return fn(nn.unbox(params), adapters, base_norms, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), rng,
            jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.asarray(_eos_array(eos_token_id)),
            jnp.int32(pad_token_id), max_new_tokens=int(max_new_tokens), return_logits=bool(return_logits))
