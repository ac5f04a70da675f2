"""``python -m train.generate``: generate text with a fine-tuned run or a base model.

    python -m train.generate --run runs/sentiment "Review: a warm, funny film. Sentiment:"
    python -m train.generate --model smollm2-135m --temperature 0.7 --top-p 0.9 "Write a haiku."

``--run`` reads the run's output directory: its configuration (``metrics.json``, or the
record of its latest checkpoint when the run has not finished) and its weights, from
``--source``: ``checkpoint`` (the adapters of the latest, or ``--step``, checkpoint in
``checkpoints/``, on the run's base model), ``peft`` (the ``peft_adapter/`` export, read
with :func:`dora_jax.import_peft`) or ``merged`` (the ``merged/`` export); ``auto`` takes
the first that exists in that order.
Prompts are formatted as in training: the tokenizer's chat template with the run's
system prompt (``--no-chat-template`` for raw text).

Adapters are merged into the weights once in memory (``--no-merge`` runs them unmerged
through :func:`dora_jax.wrap`, as in training). Decoding is KV-cached
(:mod:`dora_jax.models.generation`); ``--no-cache`` recomputes the whole sequence per
token, and ``--time`` reports tokens/s of compiled calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Sequence

SOURCES = ("auto", "checkpoint", "peft", "merged")


@dataclasses.dataclass
class Generator:
  """A model ready to generate: base (or merged) params, optional adapters, tokenizer, formatting."""

  model: Any
  params: Any
  tokenizer: Any
  adapters: Any = None
  lora_config: Any = None
  chat_template: bool = True
  system_prompt: str | None = None
  description: str = ""
  base_norms: Any = None

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """The tokenizer's EOS and the model config's (one or several)."""
    ids = []
    for v in (getattr(self.tokenizer, "eos_token_id", None), self.model.config.eos_token_id):
      ids += [] if v is None else ([v] if isinstance(v, int) else list(v))
    return tuple(dict.fromkeys(int(i) for i in ids))

  @property
  def pad_token_id(self) -> int:
    pad = getattr(self.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else (self.eos_token_ids or (0,))[0]


# ---------------------------------------------------------------------------
# Loading


def _run_config(run: Path) -> dict[str, Any]:
  """The run's configuration: ``metrics.json``'s, else its latest checkpoint record's."""
  metrics = run / "metrics.json"
  if metrics.is_file():
    cfg = json.loads(metrics.read_text()).get("config")
    if cfg:
      return cfg
  ckpt_dir = run / "checkpoints"
  if ckpt_dir.is_dir():
    record = _checkpoint_record(ckpt_dir)
    if record is not None:
      return record[1]["config"]
  raise FileNotFoundError(
      f"{run} has neither a finished run's metrics.json nor a checkpoint: is it a run's --output-dir?")


def _checkpoint_record(ckpt_dir: Path, step: int | None = None) -> tuple[int, dict] | None:
  """``(step, record)`` of a trainer checkpoint (read only), or None when there is none."""
  import orbax.checkpoint as ocp
  logging.getLogger("absl").setLevel(logging.ERROR)  # "read only", "state could not be restored"
  mgr = ocp.CheckpointManager(ckpt_dir.absolute(), item_names=("state", "record"),
                              options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    steps = sorted(mgr.all_steps())
    if not steps:
      return None
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"No checkpoint at step {step} in {ckpt_dir}; steps: {steps}.")
    out = mgr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return step, dict(out["record"])
  finally:
    mgr.close()


def _train_config(cfg: dict[str, Any]):
  """A ``TrainConfig`` with the run's model, base and adapter fields (the rest default).

  ``targets`` keeps its form: a list is module names, a string 'all-linear' or a regex (as
  ``metrics.json`` and the checkpoint record store them)."""
  from train.config import TrainConfig
  keys = ("model", "dtype", "scan_layers", "method", "quantize", "targets", "rank", "alpha", "dropout",
          "rslora", "d_initial", "projection_prng_key", "chat_template", "system_prompt")
  kw = {k: cfg[k] for k in keys if k in cfg}
  if isinstance(kw.get("targets"), list):
    kw["targets"] = tuple(kw["targets"])
  return TrainConfig(**kw)


def quantized_base(gen: Generator, method: str) -> Any:
  """The base params quantized as the trainer's ``--quantize method`` did
  (:func:`train.setup.quantize_base`'s selection: every linear kernel but ``lm_head``)."""
  import jax.numpy as jnp
  import dora_jax
  layouts = dora_jax.kernel_layouts(gen.model, jnp.zeros((1, 8), jnp.int32))
  return dora_jax.quantize(gen.params, method=method, layouts=layouts)


def _model(config, dtype: str, scan_layers: bool):
  import jax.numpy as jnp
  from dora_jax.models.llama import Llama
  return Llama(config, dtype=jnp.dtype(dtype), scan_layers=scan_layers)


@functools.lru_cache(maxsize=2)
def _load_base_model(model: str, dtype: str, scan_layers: bool):
  from train.modeling import load_base_model
  return load_base_model(types.SimpleNamespace(model=model, dtype=dtype, scan_layers=scan_layers))


def load_base(model: str, dtype: str = "float32", scan_layers: bool = False) -> Generator:
  """A base model by the trainer's ``--model`` names: 'smollm2-135m', 'tiny-random' or a
  Hugging Face checkpoint directory (the last two loaded are kept for the next call)."""
  base = _load_base_model(model, dtype, scan_layers)
  return Generator(_model(base.config, dtype, scan_layers), base.params, base.tokenizer,
                   description=f"base model {model}")


def load_run(run: str | os.PathLike, source: str = "auto", step: int | None = None) -> Generator:
  """The model of a trainer run (see the module docstring for ``source``).

  Raises:
    FileNotFoundError: not a run directory, or the requested source is absent.
    ValueError: an unknown source.
  """
  import jax
  import dora_jax
  from train.setup import lora_config, system_prompt

  if source not in SOURCES:
    raise ValueError(f"--source must be one of {SOURCES}, got {source!r}.")
  run = Path(run)
  if not run.is_dir():
    raise FileNotFoundError(f"Run directory {run} does not exist.")
  cfg = _train_config(_run_config(run))
  found = {"checkpoint": (run / "checkpoints").is_dir() and _checkpoint_record(run / "checkpoints") is not None,
           "peft": (run / "peft_adapter" / "adapter_config.json").is_file(),
           "merged": (run / "merged" / "config.json").is_file()}
  if source == "auto":
    source = next((s for s in ("checkpoint", "peft", "merged") if found[s]), None)
    if source is None:
      raise FileNotFoundError(f"{run} holds no checkpoints/, peft_adapter/ or merged/ to generate with.")
  elif not found[source]:
    where = {"checkpoint": "checkpoints/", "peft": "peft_adapter/", "merged": "merged/"}[source]
    raise FileNotFoundError(f"{run} has no {where} (found: {[s for s, ok in found.items() if ok] or 'nothing'}).")
  fmt = dict(chat_template=cfg.chat_template, system_prompt=system_prompt(cfg))

  if source == "merged":
    from transformers import AutoTokenizer
    from dora_jax.models import hf
    config, params = hf.load_pretrained(run / "merged", dtype=cfg.dtype, scan_layers=cfg.scan_layers)
    tokenizer = AutoTokenizer.from_pretrained(str(run / "merged"), local_files_only=True)
    return Generator(_model(config, cfg.dtype, cfg.scan_layers), params, tokenizer,
                     description=f"{run / 'merged'} (merged export)", **fmt)

  gen = load_base(cfg.model, cfg.dtype, cfg.scan_layers)
  gen.chat_template, gen.system_prompt = fmt["chat_template"], fmt["system_prompt"]
  full_precision, on = gen.params, cfg.model
  if cfg.quantize != "none":  # the adapters trained on (and the PEFT export applies to) this base
    gen.params = quantized_base(gen, cfg.quantize)
    on = f"{cfg.model} ({cfg.quantize}-quantized base)"
  if source == "peft":
    adapters, lcfg = dora_jax.import_peft(run / "peft_adapter", full_precision)  # shapes: the fp kernels
    gen.description = f"{run / 'peft_adapter'} on {on}"
  else:
    from train.checkpoint import TrainCheckpointer
    ckpt_step, record = _checkpoint_record(run / "checkpoints", step)
    with TrainCheckpointer((run / "checkpoints").absolute(), record["config"], async_save=False) as ckpt:
      trainable = ckpt.restore(ckpt_step)["trainable"]
    lcfg = lora_config(cfg)
    gen.description = f"{run / 'checkpoints'} step {ckpt_step} ({cfg.method}) on {on}"
    if lcfg is None:  # full fine-tuning: the checkpoint holds every weight
      gen.params = jax.tree.map(lambda p, t: jax.numpy.asarray(t, p.dtype), gen.params, trainable)
      return gen
    adapters = trainable
  gen.adapters, gen.lora_config = adapters, lcfg
  if lcfg.use_dora:
    gen.base_norms = dora_jax.linen.base_norms(gen.params, adapters)
  return gen


# ---------------------------------------------------------------------------
# Generating


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat_template: bool = True,
                   system_prompt: str | None = None) -> list[list[int]]:
  """Token ids of each prompt as the trainer formats it (``train.data.encode_example``): the chat
  template's rendering of ``[system?, user]`` with the generation prompt, tokenized without added
  special tokens; without a template the text (after ``system_prompt + "\\n"``) with them."""
  from train.data import has_chat_template
  if chat_template and has_chat_template(tokenizer):
    texts = []
    for p in prompts:
      msgs = ([] if system_prompt is None else [{"role": "system", "content": system_prompt}])
      texts.append(tokenizer.apply_chat_template(msgs + [{"role": "user", "content": p}],
                                                 add_generation_prompt=True, tokenize=False))
    add_special = False
  else:
    texts = [(system_prompt + "\n" + p) if system_prompt else p for p in prompts]
    add_special = True
  return [list(map(int, ids)) for ids in tokenizer(texts, add_special_tokens=add_special)["input_ids"]]


def generate_texts(gen: Generator, prompts: Sequence[str], *, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   use_cache: bool = True, ignore_eos: bool = False) -> tuple[list[str], Any]:
  """Completions of ``prompts`` (special tokens dropped) and the raw
  :class:`~dora_jax.models.generation.GenerateOutput`."""
  import numpy as np
  from dora_jax.models.generation import generate, left_pad

  ids, mask = left_pad(encode_prompts(gen.tokenizer, prompts, chat_template=gen.chat_template,
                                      system_prompt=gen.system_prompt), gen.pad_token_id, multiple=8)
  out = generate(gen.model, gen.params, ids, mask, max_new_tokens=max_new_tokens,
                 adapters=gen.adapters, lora_config=gen.lora_config, base_norms=gen.base_norms,
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 eos_token_id=None if ignore_eos else gen.eos_token_ids, pad_token_id=gen.pad_token_id,
                 use_cache=use_cache)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  texts = [gen.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True) for i in range(len(prompts))]
  return texts, out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
  if not predictions:
    return 0.0
  return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


# ---------------------------------------------------------------------------
# The command


class _Help(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except None (those options explain their default)."""

  def _get_help_string(self, action):
    return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m train.generate", formatter_class=_Help,
      description="Generate text with a fine-tuned run (--run) or a base model (--model).")
  p.add_argument("prompts", nargs="*", help="Prompts; '-' reads one prompt per line from stdin.")
  who = p.add_mutually_exclusive_group(required=True)
  who.add_argument("--run", help="A trainer run's output directory.")
  who.add_argument("--model", help="A base model: smollm2-135m, tiny-random or an HF checkpoint directory.")
  p.add_argument("--source", default="auto", choices=SOURCES,
                 help="With --run: which weights (auto = checkpoint, else peft, else merged).")
  p.add_argument("--step", type=int, default=None, help="With --source checkpoint: this step (default latest).")
  p.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate at most per prompt.")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
  p.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens (0 = all).")
  p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (1 = all).")
  p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
  p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                 help="Format prompts with the tokenizer's chat template (default: as the run trained; on with --model).")
  p.add_argument("--system-prompt", default=None,
                 help="'default' (the template's own), 'none' (empty) or a text (default: the run's).")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="Compute dtype (default: the run's; float32 with --model).")
  p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                 help="KV cache (--no-cache recomputes the whole sequence for every token).")
  p.add_argument("--ignore-eos", action="store_true", help="Always generate --max-new-tokens (benchmarks).")
  p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                 help="Merge a run's adapters into the weights once in memory (fast); --no-merge runs them"
                      " unmerged through dora_jax.wrap, as in training (DoRA recomputes its column norms"
                      " every token).")
  p.add_argument("--time", action="store_true",
                 help="After a first call (which compiles), time 3 more and report the median tokens/s.")
  p.add_argument("--json", action="store_true", help="Print one JSON object per prompt.")
  return p


def _normalize_flags(argv: Sequence[str]) -> list[str]:
  """``--max_new_tokens`` → ``--max-new-tokens`` (both spellings are accepted)."""
  out = []
  for a in argv:
    if a.startswith("--"):
      name, eq, value = a.partition("=")
      a = name.replace("_", "-") + eq + value
    out.append(a)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = build_parser().parse_args(_normalize_flags(sys.argv[1:] if argv is None else argv))
  prompts = list(args.prompts)
  if prompts == ["-"]:
    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
  if not prompts:
    print("error: give at least one prompt (or '-' to read them from stdin)", file=sys.stderr)
    return 2
  try:
    if args.run:
      gen = load_run(args.run, args.source, args.step)
      if args.dtype:
        gen.model = gen.model.clone(dtype=args.dtype)
    else:
      gen = load_base(args.model, args.dtype or "float32")
    if args.merge and gen.adapters is not None:
      import dora_jax
      gen.params = dora_jax.merge(gen.params, gen.adapters, gen.lora_config)
      gen.adapters = gen.lora_config = gen.base_norms = None
      gen.description += ", merged in memory"
    if args.chat_template is not None:
      gen.chat_template = args.chat_template
    if args.system_prompt is not None:
      gen.system_prompt = {"default": None, "none": ""}.get(args.system_prompt, args.system_prompt)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, use_cache=args.cache, ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    texts, out = generate_texts(gen, prompts, **kw)
    out.tokens.block_until_ready()
    first = time.perf_counter() - t0
    if args.time:
      runs = []
      for _ in range(3):
        t0 = time.perf_counter()
        texts, out = generate_texts(gen, prompts, **kw)
        out.tokens.block_until_ready()
        runs.append(time.perf_counter() - t0)
      seconds = sorted(runs)[1]
    else:
      seconds = first
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = int(out.lengths.sum())
  for prompt, text, length in zip(prompts, texts, out.lengths.tolist()):
    if args.json:
      print(json.dumps({"prompt": prompt, "completion": text, "new_tokens": length}, ensure_ascii=False))
    else:
      print(f">>> {prompt}\n{text}\n")
  timing = (f"{n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s (median of 3 compiled calls; the first took"
            f" {first:.1f} s)" if args.time else f"{n} tokens in {seconds:.1f} s (compilation included; --time"
            " measures a compiled call)")
  print(f"[{gen.description}; {'KV cache' if args.cache else 'no cache'}; {timing}]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
