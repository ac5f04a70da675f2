"""What a finished run leaves: the merged model and/or the PEFT adapter, ``loss.png`` and
(with ``--track-decomposition``) ``decomposition.png``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

import dora_jax
from train.run_dir import METRICS_LINES, METRICS_SUMMARY, read_records, recover_dir, replace_dir

logger = logging.getLogger("train")

PEFT_TASK_TYPE = "CAUSAL_LM"  # the trainer fine-tunes causal LMs: PEFT loads a PeftModelForCausalLM


def export(kind: str, out: Path, base, params, trainable, lcfg, model: str) -> dict[str, str]:
  """Exports the merged model (HF-style safetensors dir, ``kind`` merged/both) and/or the PEFT
  adapter (peft/both, PEFT ``task_type`` ``CAUSAL_LM``); returns ``{"merged"|"peft": path}``."""
  from dora_jax.models import hf

  done = {}
  primary = jax.process_index() == 0
  if kind in ("merged", "both"):
    merged = trainable if lcfg is None else dora_jax.merge(params, trainable, lcfg)
    path = out / "merged"
    if primary:
      recover_dir(path)  # what an export killed midway left
      hf.save_pretrained(path, base.config, jax.device_get(merged), tokenizer=base.tokenizer)
    done["merged"] = str(path)
  if kind in ("peft", "both") and lcfg is not None:
    path = out / "peft_adapter"
    host = jax.device_get(trainable)
    if primary:
      replace_dir(path, lambda tmp: dora_jax.export_peft(
          tmp, host, lcfg, params=params, base_model_name_or_path=base_model_path(model),
          task_type=PEFT_TASK_TYPE))
    done["peft"] = str(path)
  return done


def base_model_path(model: str) -> str:
  """The PEFT export's ``base_model_name_or_path``: a directory ``from_pretrained`` loads (the bundled
  SmolLM2's converted cache directory, an HF checkpoint directory made absolute), else the name."""
  if model in ("smollm2-135m", "smollm2"):
    from dora_jax.models.smollm2 import smollm2_path
    return str(smollm2_path())
  if Path(model).is_dir():
    return str(Path(model).absolute())
  return model


def plot_run(out: Path, kind: str) -> None:
  """``loss.png``: the training loss per step, and the before/after evaluation."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  recs = read_records(out / METRICS_LINES)
  steps_ = [r["step"] for r in recs if "loss" in r]
  losses = [r["loss"] for r in recs if "loss" in r]
  summary = json.loads((out / METRICS_SUMMARY).read_text())
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  axes[0].plot(steps_, losses, lw=1, alpha=0.5, label="loss")
  if len(losses) >= 10:
    w = max(len(losses) // 20, 5)
    axes[0].plot(steps_[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"), lw=2, label=f"mean of {w}")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("train loss (nats / response token)")
  axes[0].legend()
  metric = "accuracy" if kind == "label" else "perplexity"
  pts = [(0, summary["before"][metric])] + [(e["step"], e[metric]) for e in summary["evals"]]
  pts.append((summary["config"]["steps"], summary["after"][metric]))
  if len(pts) > 2:
    axes[1].plot(*zip(*pts), marker="o")
  else:  # before and after only: two markers, not a line that suggests what happened in between
    axes[1].plot(*zip(*pts), "o")
    axes[1].set_title("--eval-every N evaluates during the run", fontsize=8)
  if kind == "label" and summary.get("majority_class_rate"):
    axes[1].axhline(summary["majority_class_rate"], ls="--", c="gray", label="majority class")
    axes[1].legend()
  axes[1].set_xlabel("step")
  axes[1].set_ylabel(f"held-out {metric}")
  fig.suptitle(f"{summary['config']['method']} on {summary['config']['task']} ({summary['config']['model']})")
  fig.tight_layout()
  fig.savefig(out / "loss.png", dpi=110)
  plt.close(fig)
