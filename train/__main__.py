"""``python -m train``: fine-tune a causal LM with DoRA / LoRA / full fine-tuning."""

from __future__ import annotations

import logging
import os
import sys


def main(argv=None) -> int:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from train.config import load_config

  try:
    cfg = load_config(argv)  # cheap checks (fields, method x export, ...) before the model loads
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from train.checkpoint import CheckpointMismatchError, CorruptCheckpointError
  from train.loop import StopRequested, run
  from train.run_dir import RunLockedError

  try:
    summary = run(cfg)
  except StopRequested as e:  # SIGINT / SIGTERM: the run said what it saved, if anything
    print(f"stopped by {e}", file=sys.stderr)
    return 128 + e.signum
  except (RunLockedError, CheckpointMismatchError, CorruptCheckpointError, ValueError,
          FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)  # one line, no traceback
    return 2
  if "after" in summary:
    b, a = summary["before"], summary["after"]
    if "accuracy" in a:
      print(f"zero-shot accuracy {b['accuracy']:.1%} -> fine-tuned {a['accuracy']:.1%} "
            f"(majority class {summary['majority_class_rate']:.1%}); "
            f"{summary['wall_seconds']:.0f}s wall; metrics in {cfg.output_dir}/metrics.json")
    else:
      print(f"perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f}; "
            f"{summary['wall_seconds']:.0f}s wall; metrics in {cfg.output_dir}/metrics.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
