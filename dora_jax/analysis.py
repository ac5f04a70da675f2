"""The paper's weight-decomposition analysis (DoRA, Liu et al. 2024, §3 and Fig. 2).

For an adapted kernel ``W0: [I, O]`` and its fine-tuned value ``Wt`` (the merged kernel
of any adapter method, or the updated kernel of full fine-tuning), the analysis splits
each into magnitude and direction (``W = m ⊙ V / ||V||_c``, paper eq. 2) and reports

* ``ΔM = mean_n |m_n^t − m_n^0|`` — the mean change of the column norms, and
* ``ΔD = mean_n (1 − cos(W_n^t, W0_n))`` — the mean change of direction,

over the output features ``n``. Plotting ``ΔM`` against ``ΔD`` for every layer and several
checkpoints shows the paper's finding: full fine-tuning and DoRA move the two with a
negative slope, LoRA with a clearly positive one.

The per-kernel math is :func:`dora_jax.core.decomposition_shift`; this module applies it to
every chosen kernel of a params tree, per layer of a stacked (``nn.scan``) kernel, and
draws the plot (matplotlib, an optional dependency, is imported only by
:func:`plot_decomposition`).
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import core
from dora_jax import tree as tree_lib

Params = Mapping[str, Any]
Record = dict[str, Any]

_LAYER_INDEX = re.compile(r"(?:^|/)(?:layers?|h|blocks?)_(\d+)(?:/|$)")


def kernel_shift(w0: jax.Array, wt: jax.Array,
                 layout: tree_lib.KernelLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(ΔM, ΔD)`` of one kernel, per layer of its stacked axes.

  Args:
    w0: the pre-trained kernel, ``[*stack, *inputs, *outputs]`` as ``layout`` says (any
      float dtype; computed in float32).
    wt: the fine-tuned kernel, same shape.
    layout: how the axes split (default: a 2-D ``[I, O]`` kernel).

  Returns:
    ``(delta_m, delta_d)``: float32 numpy arrays of the stack's shape (``()`` unstacked).

  Raises:
    ValueError: if the shapes differ (the two kernels are not the same layer).
  """
  if tuple(w0.shape) != tuple(wt.shape):
    raise ValueError(f"kernel_shift: the base kernel has shape {tuple(w0.shape)} but the tuned one"
                     f" {tuple(wt.shape)}: pass the same layer's kernels.")
  layout = layout or tree_lib.KernelLayout()
  mat = layout.matrix_shape(tuple(w0.shape))
  fn = core.decomposition_shift
  for _ in range(layout.stack):
    fn = jax.vmap(fn)
  dm, dd = fn(jnp.reshape(w0, mat), jnp.reshape(wt, mat))
  return np.asarray(dm, np.float32), np.asarray(dd, np.float32)


def _select(paths: Sequence[str], modules: Sequence[str] | str | None, what: str) -> list[str]:
  if modules is None:
    return list(paths)
  if isinstance(modules, str):
    modules = [modules]
  for name in modules:
    if not any(tree_lib._name_matches(p, name) for p in paths):  # pylint: disable=protected-access
      raise ValueError(f"modules entry {name!r} matches none of the {what}: {list(paths)[:20]}"
                       f"{' ...' if len(paths) > 20 else ''}. Pass name suffixes such as 'q_proj'.")
  return [p for p in paths if any(tree_lib._name_matches(p, n) for n in modules)]  # pylint: disable=protected-access


def _layer_of(path: str) -> int | None:
  found = _LAYER_INDEX.findall(path)
  return int(found[-1]) if found else None


def weight_decomposition(
    base_params: Params,
    *,
    adapters: Mapping | None = None,
    config: Any = None,
    tuned_params: Params | None = None,
    modules: Sequence[str] | str | None = None,
    layouts: Mapping[str, tree_lib.KernelLayout] | None = None,
) -> list[Record]:
  """``ΔM`` and ``ΔD`` of every chosen kernel, per layer (DoRA paper §3, Fig. 2).

  Give either ``adapters`` and their ``config`` (any method: LoRA, DoRA, VeRA — they are
  folded in with :func:`dora_jax.merge`, so ``Wt`` is the kernel the model runs), or
  ``tuned_params`` (full fine-tuning: the updated kernels are decomposed).

  Args:
    base_params: the pre-trained params (boxed or not; quantized kernels are dequantized).
    adapters: the trained adapters (with ``config``).
    config: the adapter config they were made with.
    tuned_params: fully fine-tuned params, same tree as ``base_params``.
    modules: module-name suffixes (``target_modules``' form, e.g. ``["q_proj", "v_proj"]``);
      ``None``: every adapted kernel (adapters) or every linear layer except ``lm_head``
      (full fine-tuning).
    layouts: ``{path: KernelLayout}`` for kernels that are not plain 2-D (stacked by
      ``nn.scan``, several input axes) in full fine-tuning, from
      :func:`dora_jax.kernel_layouts`; adapters carry their own layouts.

  Returns:
    One record per kernel and layer, in tree order:
    ``{"module": path, "layer": i, "delta_m": float, "delta_d": float}``. ``layer`` is the
    index along a stacked kernel's (flattened) stack axes, else the ``layers_N`` number in
    the path (``None`` when the path has none).

  Raises:
    ValueError: for neither or both of ``adapters`` / ``tuned_params``, adapters without a
      config, a ``modules`` name that matches no candidate kernel, or a tuned tree whose
      kernels differ in shape from the base's.
  """
  if (adapters is None) == (tuned_params is None):
    raise ValueError("weight_decomposition: pass either adapters= (with config=) or tuned_params="
                     " (full fine-tuning), not both nor neither.")
  base = tree_lib.unbox(base_params)
  if adapters is not None:
    if config is None:
      raise ValueError("weight_decomposition: adapters need the config they were made with"
                       " (config=LoraConfig(...) or VeraConfig(...)).")
    found = tree_lib.check_adapters(base, adapters, config)
    tuned = tree_lib.unbox(tree_lib.merge(base, adapters, config))
    paths = _select(list(found), modules, "adapted kernels")
  else:
    tuned = tree_lib.unbox(tuned_params)
    found = dict(layouts or {})
    cands = [(p, tree_lib.module_kind(p, m, found)) for p, m in tree_lib.iter_modules(base)]
    if modules is None:
      spec = types.SimpleNamespace(target_modules="all-linear", exclude_modules=None)
      paths = tree_lib.select_paths(cands, spec)
    else:
      paths = _select([p for p, _ in cands], modules, "params' modules")
  records = []
  for path in paths:
    w0 = tree_lib.kernel_value(tree_lib.get_path(base, path), path)
    try:
      wt = tree_lib.kernel_value(tree_lib.get_path(tuned, path), path)
    except (KeyError, TypeError) as e:
      raise ValueError(f"weight_decomposition: the tuned params have no kernel at '{path}'.") from e
    layout = found.get(path) or tree_lib.default_layout(path, tuple(w0.shape))
    dm, dd = kernel_shift(w0, wt, layout)
    if dm.ndim == 0:
      records.append({"module": path, "layer": _layer_of(path),
                      "delta_m": float(dm), "delta_d": float(dd)})
    else:
      for i, (m, d) in enumerate(zip(dm.reshape(-1), dd.reshape(-1))):
        records.append({"module": path, "layer": i, "delta_m": float(m), "delta_d": float(d)})
  return records


def decomposition_slope(records: Sequence[Mapping[str, Any]], *, within_step: bool = False) -> float:
  """The least-squares slope of ``ΔM`` on ``ΔD`` over ``records`` (the paper's Fig. 2 trend).

  Args:
    records: from :func:`weight_decomposition` (with ``"step"`` for ``within_step``).
    within_step: fit after subtracting each step's mean ``ΔD`` and ``ΔM`` (the slope across
      layers at the same step, pooled over steps), so that both growing with training does
      not by itself make the slope positive. Default: the plain fit over all points.

  Returns ``nan`` for fewer than two points or when every (centred) ``ΔD`` is the same.
  """
  x = np.array([r["delta_d"] for r in records], np.float64)
  y = np.array([r["delta_m"] for r in records], np.float64)
  if within_step and len(x):
    steps = np.array([r.get("step", 0) for r in records])
    for s in np.unique(steps):
      x[steps == s] -= x[steps == s].mean()
      y[steps == s] -= y[steps == s].mean()
  if len(x) < 2 or np.ptp(x) == 0:
    return float("nan")
  return float(np.polyfit(x, y, 1)[0])


def _matches(path: str, module: str | None) -> bool:
  return module is None or tree_lib._name_matches(path, module)  # pylint: disable=protected-access


def plot_decomposition(
    records_by_method: Mapping[str, Sequence[Mapping[str, Any]]],
    out_png: str | Path,
    modules: Sequence[str] | None = None,
    title: str | None = None,
) -> dict[str, dict[str, float]]:
  """Draws the paper's Fig. 2: ``ΔD`` on x, ``ΔM`` on y, one point per layer and checkpoint.

  One column per method, one row per entry of ``modules`` (all records in one row when
  ``None``); points are coloured by their ``"step"`` (records without one count as step 0),
  and each panel's title gives the least-squares slope (:func:`decomposition_slope`).

  Args:
    records_by_method: ``{method label: records}`` from :func:`weight_decomposition` with a
      ``"step"`` added (e.g. by ``train.analysis.track``).
    out_png: where the PNG is written (its folder is created).
    modules: module-name suffixes, one row each (e.g. ``["q_proj", "v_proj"]``).
    title: the figure's title.

  Returns:
    ``{method: {module or "all": slope}}``.

  Raises:
    ImportError: matplotlib is not installed (``pip install matplotlib``).
    ValueError: no records at all, or a module row that no method has records for.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("plot_decomposition needs matplotlib: pip install matplotlib") from e
  if not records_by_method or not any(records_by_method.values()):
    raise ValueError("plot_decomposition: no records to plot.")
  rows = list(modules) if modules else [None]
  for m in rows:
    if not any(_matches(r["module"], m) for recs in records_by_method.values() for r in recs):
      raise ValueError(f"plot_decomposition: no record is for module {m!r}.")
  methods = list(records_by_method)
  steps = [r.get("step", 0) for recs in records_by_method.values() for r in recs]
  norm = matplotlib.colors.Normalize(min(steps), max(max(steps), min(steps) + 1))
  fig, axes = plt.subplots(len(rows), len(methods), figsize=(3.6 * len(methods) + 1, 3.2 * len(rows) + 0.4),
                           squeeze=False, layout="constrained")
  slopes: dict[str, dict[str, float]] = {m: {} for m in methods}
  scatter = None
  for i, module in enumerate(rows):
    for j, method in enumerate(methods):
      ax = axes[i][j]
      recs = [r for r in records_by_method[method] if _matches(r["module"], module)]
      slope = decomposition_slope(recs)
      slopes[method][module or "all"] = slope
      if recs:
        x = [r["delta_d"] for r in recs]
        y = [r["delta_m"] for r in recs]
        scatter = ax.scatter(x, y, c=[r.get("step", 0) for r in recs], cmap="viridis", norm=norm,
                             s=14, alpha=0.85)
        if np.isfinite(slope):
          xs = np.linspace(min(x), max(x), 2)
          ax.plot(xs, np.polyval(np.polyfit(x, y, 1), xs), c="crimson", lw=1)
      ax.set_title(f"{method}{' ' + module if module else ''}: slope {slope:.3g}", fontsize=9)
      ax.set_xlabel("ΔD")
      if j == 0:
        ax.set_ylabel("ΔM")
      ax.ticklabel_format(style="sci", scilimits=(-3, 3))
  if scatter is not None:
    fig.colorbar(scatter, ax=axes, label="step", shrink=0.8)
  if title:
    fig.suptitle(title)
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return slopes
