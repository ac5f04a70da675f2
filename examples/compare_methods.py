"""DoRA vs LoRA vs full fine-tuning on the same task and budget; prints a table, writes a PNG.

Run: python examples/compare_methods.py [--steps 40] [--model smollm2-135m] [--task rotten_tomatoes]
(each method is one trainer run; about 10 minutes per method on 2 CPU cores with the defaults).
"""

import argparse
import json
from pathlib import Path

from train.config import make_config, read_config_file
from train.loop import run

parser = argparse.ArgumentParser()
parser.add_argument("--config", default="train/configs/sentiment.toml")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--model", default=None)
parser.add_argument("--task", default=None)
parser.add_argument("--out", default="runs/compare")
parser.add_argument("--methods", default="dora,lora,full")
args = parser.parse_args()

base = read_config_file(Path(args.config))
for key in ("steps", "model", "task"):
  if getattr(args, key) is not None:
    base[key] = getattr(args, key)
results = {}
for method in args.methods.split(","):
  cfg = make_config({**base, "method": method, "output_dir": f"{args.out}/{method}", "overwrite": True,
                     "export": "none", "learning_rate": base.get("learning_rate", 5e-4) if method != "full" else 5e-5})
  results[method] = run(cfg)

metric = "accuracy" if "accuracy" in next(iter(results.values()))["after"] else "perplexity"
print(f"\n{'method':8s} {'trainable':>12s} {metric + ' before':>18s} {metric + ' after':>17s} {'s/step':>7s}")
for method, s in results.items():
  print(f"{method:8s} {s['trainable_params']:12,d} {s['before'][metric]:18.4f} {s['after'][metric]:17.4f}"
        f" {s['median_step_seconds']:7.2f}")
Path(args.out).mkdir(parents=True, exist_ok=True)
(Path(args.out) / "comparison.json").write_text(json.dumps(
    {m: {k: s[k] for k in ("trainable_params", "before", "after", "median_step_seconds", "final_loss")}
     for m, s in results.items()}, indent=2))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 3.5))
for method in results:
  recs = [json.loads(l) for l in (Path(args.out) / method / "metrics.jsonl").read_text().splitlines()]
  ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=f"{method} ({metric} "
          f"{results[method]['after'][metric]:.3f})")
ax.set_xlabel("step")
ax.set_ylabel("train loss")
ax.legend()
fig.tight_layout()
fig.savefig(Path(args.out) / "comparison.png", dpi=110)
print(f"wrote {args.out}/comparison.json and comparison.png")
