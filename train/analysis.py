"""The trainer's weight-decomposition tracking (DoRA paper §3, Fig. 2) and its plot.

:func:`track` turns one step's state into ``metrics.jsonl`` records of kind
``"decomposition"`` (ΔM and ΔD per chosen module and layer, from
:func:`dora_jax.weight_decomposition`); :func:`plot_run_decomposition` reads them back and
draws the paper's ΔD–ΔM plot (:func:`dora_jax.plot_decomposition`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

import dora_jax
from train.run_dir import METRICS_LINES, METRICS_SUMMARY, read_records

KIND = "decomposition"


def base_copy(params: Any) -> Any:
  """A host copy of the base params, for full fine-tuning: the train step donates (and so
  deletes) the buffers of what it trains, which for ``--method full`` are the base params."""
  return jax.tree.map(np.array, jax.device_get(dora_jax.tree.unbox(params)))


def track(step: int, base_params: Any, trainable: Any, lora_config: Any,
          modules: Sequence[str] | str | None, *,
          layouts: Mapping[str, dora_jax.KernelLayout] | None = None) -> list[dict[str, Any]]:
  """ΔM and ΔD of the chosen modules at ``step``, as ``metrics.jsonl`` records.

  Args:
    step: the optimizer step the state is after.
    base_params: the pre-trained params (for full fine-tuning, a copy kept before training:
      :func:`base_copy`).
    trainable: the adapters (``lora_config`` given) or the fully fine-tuned params
      (``lora_config`` None).
    lora_config: the run's adapter config, or None for full fine-tuning.
    modules: module-name suffixes (``("q_proj", "v_proj")``); None or empty: every adapted
      kernel (every linear layer but ``lm_head`` for full fine-tuning).
    layouts: for full fine-tuning of stacked (``--scan-layers``) kernels:
      ``dora_jax.kernel_layouts(model, ...)``.

  Returns:
    ``[{"kind": "decomposition", "step": step, "module": path, "layer": i, "delta_m": ΔM,
    "delta_d": ΔD}, ...]`` — one per module and layer.

  Raises:
    ValueError: a module name that matches no (adapted) kernel (from
      :func:`dora_jax.weight_decomposition`).
  """
  modules = list(modules) if modules and not isinstance(modules, str) else (modules or None)
  trainable = jax.device_get(trainable)
  if lora_config is None:
    recs = dora_jax.weight_decomposition(base_params, tuned_params=trainable, modules=modules,
                                         layouts=layouts)
  else:
    recs = dora_jax.weight_decomposition(base_params, adapters=trainable, config=lora_config,
                                         modules=modules)
  return [{"kind": KIND, "step": int(step), **r} for r in recs]


def read_decomposition(metrics_jsonl_path: str | Path) -> list[dict[str, Any]]:
  """The ``"decomposition"`` records of a run's ``metrics.jsonl`` (empty if none)."""
  return [r for r in read_records(Path(metrics_jsonl_path)) if r.get("kind") == KIND]


def plot_run_decomposition(metrics_jsonl_path: str | Path, out_png: str | Path,
                           modules: Sequence[str] | None = None,
                           label: str | None = None) -> dict[str, dict[str, float]]:
  """The paper's ΔD–ΔM plot of one run: one point per layer and tracked step.

  Args:
    metrics_jsonl_path: the run's ``metrics.jsonl``.
    out_png: the PNG to write.
    modules: one row per module-name suffix (default: the tracked modules' last path
      segments, e.g. ``q_proj`` and ``v_proj``).
    label: the panel's method label (default: the run's method from ``metrics.json`` next
      to the metrics file, else ``"run"``).

  Returns:
    ``{label: {module: slope}}`` (:func:`dora_jax.plot_decomposition`).

  Raises:
    ValueError: the file holds no decomposition records (run with ``--track-decomposition``).
  """
  recs = read_decomposition(metrics_jsonl_path)
  if not recs:
    raise ValueError(f"{metrics_jsonl_path} holds no 'decomposition' records: train with"
                     " --track-decomposition N (and --track-modules q_proj,v_proj).")
  if label is None:
    summary = Path(metrics_jsonl_path).with_name(METRICS_SUMMARY)
    label = "run"
    if summary.exists():
      label = json.loads(summary.read_text()).get("config", {}).get("method", "run")
  if modules is None:
    modules = sorted({r["module"].rsplit("/", 1)[-1] for r in recs})
  return dora_jax.plot_decomposition({label: recs}, out_png, modules=modules)


def make_tracker(trainable: Any, base_params: Any, lora_config: Any, modules: Sequence[str] | None, *,
                 model: Any = None) -> Callable[[int, Any], list[dict[str, Any]]] | None:
  """The trainer's ``--track-decomposition``: ``track(step, trainable) -> records`` (None when
  ``modules`` is empty: tracking off), against the base kernels kept now, at step 0: the
  frozen ``base_params`` for adapter methods, a host copy of ``trainable`` for full fine-tuning
  (``lora_config`` None; its step donates the params). ``model``: for full fine-tuning of
  stacked (``--scan-layers``) kernels, whose layouts it gives.

  Raises:
    ValueError: a module name that matches no (adapted) kernel — checked now, before training —
      or several processes (the adapters are gathered on the host).
  """
  if not modules:
    return None
  if jax.process_count() > 1:
    raise ValueError("--track-decomposition runs on a single process (it gathers the adapters on"
                     " the host): drop it for multi-host runs and analyse the checkpoints instead.")
  layouts = None
  if lora_config is None:
    base_params = base_copy(trainable)
    if model is not None:
      layouts = dora_jax.kernel_layouts(model, np.zeros((1, 8), np.int32))
  fn = lambda step, tuned: track(step, base_params, tuned, lora_config, modules, layouts=layouts)
  fn(0, trainable)  # bad module names fail now, not after the first N steps
  return fn


def plot_at_end(out: Path, method: str, say: Callable[..., None]) -> dict[str, float] | None:
  """``out/decomposition.png`` from the run's records; returns ``{module: slope}`` (None
  without matplotlib, said in one line)."""
  try:
    slopes = plot_run_decomposition(out / METRICS_LINES, out / "decomposition.png", label=method)
  except ImportError as e:
    say(f"no decomposition.png: {e}")
    return None
  say("ΔM/ΔD slope per module: " + ", ".join(f"{m} {v:.3g}" for m, v in slopes[method].items())
      + f" ({out / 'decomposition.png'})")
  return slopes[method]
