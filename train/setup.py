"""What a run starts from: the base model in its shardings, the adapters (or the params, for
full fine-tuning) and their shardings, the quantized base and the cached DoRA norms; the task's
train rows and held-out set.

:func:`setup_model` and :func:`setup_data` return small dataclasses (:class:`ModelSetup`,
:class:`DataSetup`) that :func:`train.loop.run` wires together.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import dora_jax
from dora_jax.models.llama import Llama
from train import data as data_lib
from train import steps as steps_lib
from train.config import TrainConfig
from train.modeling import TINY_CONFIG, BaseModel, load_base_model

EMBED_PATH = "model/embed_tokens"  # the Llama's token embedding (the LM head when tied)


# ---------------------------------------------------------------------------
# Checks before the model loads


def targets_embedding(targets: tuple[str, ...] | str) -> bool:
  """Whether ``target_modules`` (names, 'all-linear' or a regex) adapts the token embedding."""
  if isinstance(targets, tuple):
    return any(EMBED_PATH == t or EMBED_PATH.endswith("/" + t) for t in targets)
  return targets != "all-linear" and re.fullmatch(targets, EMBED_PATH) is not None


def model_ties_embeddings(model: str) -> bool:
  """Whether ``--model`` uses its token embedding as the LM head, read without loading it (an
  HF checkpoint directory's ``config.json``; transformers' default is tied)."""
  if model == "tiny-random":
    return TINY_CONFIG.tie_word_embeddings
  if model in ("smollm2-135m", "smollm2"):
    return True  # SmolLM2-135M has no output.weight: its head is embed_tokens
  config = Path(model) / "config.json"
  if config.is_file():
    return bool(json.loads(config.read_text()).get("tie_word_embeddings", True))
  return False


def check_before_loading(cfg: TrainConfig) -> None:
  """Refusals that need the model's config but not its weights.

  Raises:
    ValueError: DoRA on a tied embedding with ``--export peft|both`` (PEFT has no equivalent:
      :func:`dora_jax.peft_format.tied_dora_message`); VeRA on the embedding with
      ``--export peft|both`` (PEFT's VeRA adapts Linear layers only).
  """
  if cfg.method == "vera" and cfg.export in ("peft", "both") and targets_embedding(cfg.targets):
    raise ValueError(f"--export {cfg.export} with --method vera: '{EMBED_PATH}' is an embedding and"
                     " PEFT's VeRA adapts Linear layers only. Use --export merged, or leave"
                     " embed_tokens out of --target-modules.")
  if (cfg.method == "dora" and cfg.export in ("peft", "both") and targets_embedding(cfg.targets)
      and model_ties_embeddings(cfg.model)):
    from dora_jax.peft_format import tied_dora_message
    raise ValueError(f"--export {cfg.export}: " + tied_dora_message(
        [EMBED_PATH], fix="Use --export merged, or leave embed_tokens out of --target-modules."))


# ---------------------------------------------------------------------------
# Model and adapters


def lora_config(cfg: TrainConfig) -> dora_jax.LoraConfig | dora_jax.VeraConfig | None:
  """The adapter config of a run: a ``LoraConfig`` (dora, lora), a ``VeraConfig`` (vera,
  dvora: ``use_dora``), or None for full fine-tuning."""
  if cfg.method == "full":
    return None
  targets = cfg.targets  # names (a tuple), 'all-linear' or a regex (a str): nothing guessed
  if cfg.method in ("vera", "dvora"):
    return dora_jax.VeraConfig(
        r=cfg.rank, target_modules=targets, projection_prng_key=cfg.projection_prng_key,
        vera_dropout=cfg.dropout, d_initial=cfg.d_initial, use_dora=cfg.method == "dvora")
  return dora_jax.LoraConfig(
      r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.dropout,
      use_dora=cfg.method == "dora", use_rslora=cfg.rslora)


def quantize_base(params, method: str, layouts, shardings) -> tuple[Any, Any]:
  """``(quantized params, their shardings)``: every linear kernel but ``lm_head`` quantized
  (:func:`dora_jax.quantize`, QLoRA's choice), each straight into the shards of the kernel it
  replaces (:func:`dora_jax.quantized_param_shardings`)."""
  qparams = dora_jax.quantize(params, method=method, layouts=layouts, shardings=shardings)
  return qparams, dora_jax.quantized_param_shardings(qparams, shardings)


def cached_base_norms(params, adapters, adapter_shardings) -> tuple[Any, Any]:
  """``(||W0||²_c per DoRA adapter, their shardings)``, or ``(None, None)`` without DoRA.

  :func:`dora_jax.linen.base_norms` computed once under ``jit``, each ``[*stack, O]`` sharded
  like its magnitude (:func:`dora_jax.sharding.adapter_shardings`); a quantized base gives the
  dequantized kernel's norms (QDoRA)."""
  from dora_jax import linen, tree as tree_lib

  norm_sh = {path: {linen.NORM_KEY: ad[dora_jax.variants.MAGNITUDE]}
             for path, ad in tree_lib.flatten_adapters(adapter_shardings).items()
             if dora_jax.variants.MAGNITUDE in ad}
  if not norm_sh:
    return None, None
  n_sh = tree_lib.unflatten(norm_sh)
  return jax.jit(linen.base_norms, out_shardings=n_sh)(params, adapters), n_sh


def count_trainable(trainable, full: bool) -> int:
  """Trainable parameters: every param (full fine-tuning) or the adapters' trainable leaves
  (VeRA's shared projections travel in the tree but are frozen)."""
  if full:
    return dora_jax.count_params(trainable)
  return sum(x.size for x, m in zip(jax.tree.leaves(trainable),
                                    jax.tree.leaves(dora_jax.trainable_mask(trainable))) if m)


@dataclasses.dataclass
class ModelSetup:
  """The model of a run, loaded and placed.

  ``frozen``/``trainable`` (and their shardings ``f_sh``/``t_sh``) are the two arguments of
  :func:`train.steps.make_forward`'s ``forward``; ``params`` is the (possibly quantized) base;
  ``base`` keeps the HF config and tokenizer (its ``params`` are dropped once quantized);
  ``layouts`` are the kernels' layouts (None for full fine-tuning).
  """

  model: Llama
  base: BaseModel
  params: Any
  lcfg: Any
  frozen: Any
  trainable: Any
  f_sh: Any
  t_sh: Any
  layouts: Any
  n_base: int
  n_train: int

  @property
  def tokenizer(self):
    return self.base.tokenizer


def load_model(cfg: TrainConfig, mesh) -> tuple[Llama, BaseModel, Any]:
  """``(model, base, param shardings)``: the base model read straight into its shardings."""
  sh = dora_jax.sharding

  def shardings_for(config):
    abstract = sh.abstract_params(Llama(config, scan_layers=cfg.scan_layers), jnp.zeros((1, 8), jnp.int32))
    return sh.param_shardings(abstract, mesh)

  base = load_base_model(cfg, shardings_for)
  model = Llama(base.config, dtype=jnp.dtype(cfg.dtype), scan_layers=cfg.scan_layers, remat=cfg.remat)
  return model, base, shardings_for(base.config)


def init_adapters(key, model, params, p_sh, lcfg, mesh, *, quantize: str, replicate: bool,
                  say: Callable[..., None]) -> tuple[Any, ...]:
  """``(params, frozen, trainable, f_sh, t_sh, layouts)`` of an adapter method: the base
  quantized when ``quantize`` is not "none", the adapters initialised in their shardings
  (:func:`dora_jax.sharding.init_adapters_sharded`), DoRA's base norms cached."""
  sh = dora_jax.sharding
  layouts = dora_jax.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
  q_sh = p_sh
  if quantize != "none":
    t0 = time.time()
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    params, q_sh = quantize_base(params, quantize, layouts, p_sh)
    say(f"quantized the base to {quantize}: {n_bytes / 2**20:.0f} MiB -> "
        f"{sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20:.0f} MiB ({time.time() - t0:.1f}s)")
  # Adapter shardings follow the full-precision kernels' (a quantized kernel shards like them).
  adapters, a_sh = sh.init_adapters_sharded(key, params, lcfg, p_sh, mesh, layouts=layouts,
                                            replicate=replicate)
  norms, n_sh = cached_base_norms(params, adapters, a_sh)
  return (params, steps_lib.frozen_inputs(params, norms), adapters,
          steps_lib.frozen_inputs(q_sh, n_sh), a_sh, layouts)


def setup_model(cfg: TrainConfig, mesh, init_key, say: Callable[..., None], t_start: float) -> ModelSetup:
  """Loads the base model, quantizes it (``--quantize``) and adds the adapters (or, for
  ``--method full``, makes the params the trainable tree)."""
  model, base, p_sh = load_model(cfg, mesh)
  params = base.params
  n_base = dora_jax.count_params(params)
  say(f"model {cfg.model}: {base.config.num_params() / 1e6:.1f}M params ({time.time() - t_start:.1f}s to load)")
  lcfg = lora_config(cfg)
  if lcfg is None:
    frozen, trainable, f_sh, t_sh, layouts = {}, params, {}, p_sh, None
  else:
    params, frozen, trainable, f_sh, t_sh, layouts = init_adapters(
        init_key, model, params, p_sh, lcfg, mesh, quantize=cfg.quantize,
        replicate=cfg.replicate_adapters, say=say)
    if cfg.quantize != "none":
      base.params = None  # let the full-precision copy go (exports merge from the quantized base)
  n_train = count_trainable(trainable, lcfg is None)
  say(f"method {cfg.method}: {n_train:,} trainable parameters ({100 * n_train / n_base:.3f}% of {n_base:,})")
  return ModelSetup(model, base, params, lcfg, frozen, trainable, f_sh, t_sh, layouts, n_base, n_train)


# ---------------------------------------------------------------------------
# Data


def split_report(examples, eval_size: float, n_eval: int, n_train: int, train_size: int) -> str:
  """One line saying how the task's rows became train and eval examples."""
  n, distinct = len(examples), len(set(examples))
  spec = f"{eval_size:g} of the distinct" if eval_size < 1 else f"{int(eval_size)}"
  dup = f" ({n - distinct} exact duplicates count once)" if n > distinct else ""
  left_out = n - n_eval - n_train if not train_size else None
  cap = f", capped at --train-size {train_size}" if train_size else ""
  rest = (f"; {left_out} copies of eval examples left out of train" if left_out else "")
  return (f"split: {n} examples, {distinct} distinct{dup}; eval = {spec} -> {n_eval} (stratified by"
          f" label where there are labels), train = the other {n_train}{cap}{rest}")


def system_prompt(cfg: TrainConfig) -> str | None:
  """The data pipeline's ``system_prompt``: None keeps the template's default."""
  return {"default": None, "none": ""}.get(cfg.system_prompt, cfg.system_prompt)


def with_loss_positions(arrays: dict[str, np.ndarray], k: int | None) -> dict[str, np.ndarray]:
  """Adds ``logits_at [N, K]`` so the LM head runs only where the loss is."""
  if k is None:
    return arrays
  return {**arrays, "logits_at": steps_lib.loss_positions(arrays["loss_mask"], k)}


@dataclasses.dataclass
class DataSetup:
  """The task and its rows: ``train_arrays`` (with ``logits_at`` where the loss is on the
  response only); ``eval_set`` — for label tasks ``(rows, label_ids or None, gold)``, else
  rows like the training ones; ``eval_examples`` the held-out examples themselves (generation
  samples); ``majority`` the majority-class rate (label tasks)."""

  task: Any
  train_arrays: dict[str, np.ndarray]
  eval_set: Any
  eval_examples: tuple
  majority: float | None


def label_eval_set(task, eval_ex, tokenizer, seq_len: int, fmt: dict[str, Any]):
  """``(rows, label_ids, gold)``: one row per example scored at its last prompt position when
  every label is one token (``label_ids``), else one row per (example, label)."""
  label_ids = data_lib.label_token_ids(tokenizer, task.labels, **fmt)
  if label_ids is not None:
    rows = data_lib.prompt_rows(task, eval_ex, tokenizer, seq_len, **fmt)
    rows = {**rows, "logits_at": (rows["attention_mask"].sum(1, keepdims=True) - 1).astype(np.int32)}
  else:
    rows = data_lib.label_choice_rows(task, eval_ex, tokenizer, seq_len, **fmt)
  return rows, label_ids, np.array([ex.label_id for ex in eval_ex])


def setup_data(cfg: TrainConfig, tokenizer, say: Callable[..., None]) -> DataSetup:
  """Loads ``--task``, splits it (``--eval-size``, ``--train-size``) and tokenizes both parts."""
  task = data_lib.load_task(cfg.task, prompt_field=cfg.prompt_field, response_field=cfg.response_field,
                            text_field=cfg.text_field, label_field=cfg.label_field)
  train_ex, eval_ex = data_lib.split_examples(task.examples, cfg.eval_size, cfg.seed)
  if cfg.train_size:
    train_ex = train_ex[: cfg.train_size]
  fmt = {"chat_template": cfg.chat_template, "system_prompt": system_prompt(cfg)}
  train_arrays = data_lib.build_dataset(task, train_ex, tokenizer, cfg.seq_len, packing=cfg.packing, **fmt)
  loss_k = None
  if task.kind != "text" and not cfg.packing:
    loss_k = int(train_arrays["loss_mask"].sum(1).max())
  train_arrays = with_loss_positions(train_arrays, loss_k)
  n_rows = train_arrays["input_ids"].shape[0]
  say(split_report(task.examples, cfg.eval_size, len(eval_ex), len(train_ex), cfg.train_size))
  say(f"task {cfg.task}: {len(train_ex)} train / {len(eval_ex)} eval examples, {n_rows} rows of "
      f"{cfg.seq_len} tokens" + (f", loss on ≤{loss_k} positions per row" if loss_k else ""))
  if task.kind == "label":
    eval_set = label_eval_set(task, eval_ex, tokenizer, cfg.seq_len, fmt)
    majority = data_lib.majority_class_rate(eval_set[2])
  else:
    eval_set = data_lib.build_dataset(task, eval_ex, tokenizer, cfg.seq_len, packing=False, **fmt)
    majority = None
  return DataSetup(task, train_arrays, eval_set, tuple(eval_ex), majority)
