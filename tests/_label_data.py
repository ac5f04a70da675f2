"""A small two-label JSONL task the tiny-model trainer tests learn in a few steps."""

import json

import numpy as np

WORDS = ["good", "bad", "great", "awful", "fine", "boring", "moving", "dull"]


def label_file(tmp_path, n=96):
  """``tmp_path/sentiment.jsonl``: ``n`` rows "the film is <3 words>" labelled positive/negative."""
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    pos = i % 2 == 0
    words = rng.choice(WORDS[0::2] if pos else WORDS[1::2], 3)
    rows.append({"text": "the film is " + " ".join(words), "label": "positive" if pos else "negative"})
  path = tmp_path / "sentiment.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path
