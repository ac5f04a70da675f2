"""Parameter paths, target selection, and the adapters pytree that mirrors params.

A *module* in a params tree is a dict holding a ``kernel`` (Dense, DenseGeneral,
Einsum, Conv) or an ``embedding`` (Embed). Its path is the ``/``-joined keys
leading to it, e.g. ``model/layers/self_attn/q_proj``. The adapters tree has a
dict ``{"lora_a", "lora_b"[, "magnitude"]}`` at the same path.

A kernel is viewed as a matrix ``[*stack, I, O]``: ``stack`` leading axes added
by ``nn.scan``/``nn.vmap``, then the input axes (flattened to ``I``), then the
output axes (flattened to ``O``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax.core import meta

from dora_jax import core
from dora_jax.config import ADAPTER_KEYS, LoraConfig

Array = jax.Array
Params = Mapping[str, Any]

WEIGHT_KEYS = ("kernel", "embedding")
"""Leaf names of adaptable weights."""


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How a kernel's axes split: ``[*stack, *inputs, *outputs]``.

  Attributes:
    stack: number of leading axes added by ``nn.scan`` / ``nn.vmap``.
    inputs: number of input (contracted) axes after the stacked ones.
  """

  stack: int = 0
  inputs: int = 1

  def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``[*stack, I, O]`` for a kernel of this shape."""
    s, k = self.stack, self.inputs
    if len(shape) < s + k + 1:
      raise ValueError(
          f"A kernel of shape {shape} has no output axis under layout {self}."
      )
    return (*shape[:s], math.prod(shape[s : s + k]), math.prod(shape[s + k :]))


# ---------------------------------------------------------------------------
# Walking trees


def _strip(box: Any) -> Any:
  value = box.value if hasattr(box, "value") else box.unbox()
  return unbox(value)


def unbox(tree: Any) -> Any:
  """Strip Flax metadata boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``).

  Unlike ``flax.core.meta.unbox`` this applies no sharding constraint, so it also works on
  abstract (``eval_shape``) and already-placed trees under an active mesh.
  """
  return meta.map_axis_meta(_strip, tree)


def _is_module(node: Any) -> bool:
  return isinstance(node, Mapping) and any(
      k in node and not isinstance(node[k], Mapping) for k in WEIGHT_KEYS
  )


def iter_modules(params: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Mapping]]:
  """Yields ``(path, module_dict)`` for every dict that holds a kernel or embedding."""
  if _is_module(params):
    yield "/".join(prefix), params
  if isinstance(params, Mapping):
    for k, v in params.items():
      if isinstance(v, Mapping):
        yield from iter_modules(v, prefix + (str(k),))


def weight_key(module: Mapping) -> str:
  """``"kernel"`` or ``"embedding"``."""
  return "kernel" if "kernel" in module else "embedding"


def get_path(tree: Mapping, path: str) -> Any:
  node = tree
  for k in path.split("/") if path else ():
    node = node[k]
  return node


def set_path(tree: Mapping, path: str, value: Any) -> dict:
  """A copy of ``tree`` (dicts copied along the path only) with ``value`` at ``path``."""
  keys = path.split("/") if path else []
  if not keys:
    return value
  head, rest = keys[0], "/".join(keys[1:])
  out = dict(tree)
  out[head] = set_path(tree.get(head, {}), rest, value) if rest else value
  return out


def flatten_adapters(adapters: Mapping) -> dict[str, dict[str, Array]]:
  """``{path: {"lora_a", "lora_b"[, "magnitude"]}}`` for every adapter dict."""
  out: dict[str, dict[str, Array]] = {}

  def visit(node, prefix):
    if isinstance(node, Mapping) and "lora_a" in node:
      out["/".join(prefix)] = dict(node)
      return
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(v, prefix + (str(k),))

  visit(adapters, ())
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of a ``{path: value}`` flattening into nested dicts."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    keys = path.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


# ---------------------------------------------------------------------------
# Target selection


def _pattern_matches(path: str, spec) -> bool:
  if spec is None:
    return False
  if isinstance(spec, str):
    return re.fullmatch(spec, path) is not None
  for target in spec:
    t = target.replace(".", "/")
    if path == t or path.endswith("/" + t):
      return True
  return False


def select_targets(params: Params, config: LoraConfig) -> list[str]:
  """Paths of the modules that ``config`` adapts, in tree order.

  Raises:
    ValueError: if nothing matches; the message lists the module paths that exist.
  """
  params = unbox(params)
  modules = list(iter_modules(params))
  paths = [p for p, _ in modules]
  if config.target_modules == "all-linear":
    selected = [
        p for p, m in modules
        if "kernel" in m and not (p == "lm_head" or p.endswith("/lm_head"))
    ]
  else:
    selected = [p for p in paths if _pattern_matches(p, config.target_modules)]
  selected = [p for p in selected if not _pattern_matches(p, config.exclude_modules)]
  if not selected:
    shown = "\n  ".join(paths[:60]) + ("\n  ..." if len(paths) > 60 else "")
    raise ValueError(
        f"target_modules={config.target_modules!r} (exclude_modules="
        f"{config.exclude_modules!r}) matches no module. Modules with a kernel or"
        f" embedding:\n  {shown}\nUse name suffixes such as 'q_proj' or a regex"
        " matched in full against these paths."
    )
  return selected


# ---------------------------------------------------------------------------
# Layouts


def default_layout(path: str, shape: tuple[int, ...]) -> KernelLayout:
  """The layout of a 2-D kernel or embedding; larger kernels need an explicit one."""
  if len(shape) == 2:
    return KernelLayout(stack=0, inputs=1)
  raise ValueError(
      f"The kernel at '{path}' has shape {shape}: from the shape alone dora_jax"
      " cannot tell stacked (nn.scan) axes, input axes and output axes apart. Pass"
      " layouts=dora_jax.kernel_layouts(model, *example_inputs) (or a"
      " {path: KernelLayout(stack, inputs)} dict) to init_adapters."
  )


def layout_from_adapter(path: str, kernel_shape: tuple[int, ...], adapter: Mapping) -> KernelLayout:
  """Recover the layout of a kernel from its adapter's shapes, checking they fit."""
  a, b = adapter["lora_a"], adapter["lora_b"]
  stack = a.ndim - 2
  if stack < 0 or b.ndim != a.ndim:
    raise ValueError(
        f"Adapter at '{path}': lora_a {a.shape} and lora_b {b.shape} must be"
        " [*stack, I, r] and [*stack, r, O]."
    )
  i_dim, r = a.shape[-2], a.shape[-1]
  o_dim = b.shape[-1]
  if b.shape[-2] != r or a.shape[:stack] != b.shape[:stack]:
    raise ValueError(
        f"Adapter at '{path}': lora_a {a.shape} and lora_b {b.shape} disagree on"
        " the rank or the stacked axes."
    )
  if tuple(kernel_shape[:stack]) != tuple(a.shape[:stack]):
    raise ValueError(
        f"Adapter at '{path}' has stacked axes {a.shape[:stack]} but the kernel has"
        f" shape {kernel_shape}: these adapters were made for another model."
    )
  rest = kernel_shape[stack:]
  for k in range(1, len(rest)):
    if math.prod(rest[:k]) == i_dim and math.prod(rest[k:]) == o_dim:
      layout = KernelLayout(stack, k)
      break
  else:
    raise ValueError(
        f"Adapter at '{path}' (lora_a {a.shape}, lora_b {b.shape}) does not fit the"
        f" kernel of shape {kernel_shape}: I x O = {i_dim} x {o_dim} is not a split"
        " of its axes. These adapters were made for another model or config."
    )
  if "magnitude" in adapter and adapter["magnitude"].shape != (*a.shape[:stack], o_dim):
    raise ValueError(
        f"Adapter at '{path}': magnitude has shape {adapter['magnitude'].shape},"
        f" expected {(*a.shape[:stack], o_dim)}."
    )
  return layout


def check_adapters(params: Params, adapters: Mapping) -> dict[str, KernelLayout]:
  """Checks that every adapter sits on a kernel it fits; returns their layouts.

  Raises:
    ValueError: naming the first path that has no kernel or does not fit.
  """
  params = unbox(params)
  layouts = {}
  for path, adapter in flatten_adapters(adapters).items():
    try:
      module = get_path(params, path)
    except (KeyError, TypeError):
      module = None
    if not _is_module(module):
      existing = [p for p, _ in iter_modules(params)][:20]
      raise ValueError(
          f"The adapters have an entry at '{path}' but the params have no kernel"
          f" there. The params' modules include: {existing}. Were these adapters"
          " made for another model?"
      )
    kernel = module[weight_key(module)]
    layouts[path] = layout_from_adapter(path, tuple(kernel.shape), adapter)
  return layouts


def check_config_matches(adapters: Mapping, config: LoraConfig) -> None:
  """Checks that ``config`` describes ``adapters`` as far as arrays can tell: DoRA
  adapters (a ``magnitude`` leaf) need ``use_dora=True``, LoRA ones ``False``.

  ``lora_alpha`` and ``use_rslora`` (the scale) leave no trace in the arrays and cannot
  be checked here: take them from where the adapters were saved (``load_adapters`` and
  ``import_peft`` return the saved config).

  Raises:
    ValueError: naming the first module whose adapter disagrees with ``config.use_dora``.
  """
  for path, adapter in flatten_adapters(adapters).items():
    if ("magnitude" in adapter) != bool(config.use_dora):
      has = "has" if "magnitude" in adapter else "lacks"
      raise ValueError(
          f"The adapter at '{path}' {has} a DoRA magnitude but the config says"
          f" use_dora={config.use_dora}: use the config the adapters were made (or saved) with.")


# ---------------------------------------------------------------------------
# Stacked application of the per-kernel math


def _stacked(fn: Callable, stack: int) -> Callable:
  for _ in range(stack):
    fn = jax.vmap(fn)
  return fn


def _path_key(key: Array, path: str) -> Array:
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_adapters(
    key: Array,
    params: Params,
    config: LoraConfig,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict:
  """Creates adapters for every module that ``config`` targets.

  Args:
    key: a PRNG key. Each module's adapter draws from ``fold_in(key, crc32(path))``,
      so it does not depend on which other modules are targeted.
    params: the Linen ``params`` collection (boxed or not).
    config: the adapter config.
    layouts: ``{path: KernelLayout}`` for kernels that are not plain 2-D
      (stacked by ``nn.scan``, ``DenseGeneral``, ``Einsum``, ``Conv``); see
      :func:`dora_jax.kernel_layouts`.

  Returns:
    A nested dict mirroring ``params``: at each targeted module path,
    ``{"lora_a": [*stack, I, r], "lora_b": [*stack, r, O]}`` plus
    ``"magnitude": [*stack, O]`` for DoRA, in ``config.adapter_dtype``.
    With the default init the adapted model equals the base model.

  Example:
    >>> import jax, flax.linen as nn, dora_jax
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jax.numpy.ones((1, 3)))["params"]
    >>> cfg = dora_jax.LoraConfig(r=2, target_modules=".*", use_dora=True)
    >>> ad = dora_jax.init_adapters(jax.random.key(1), {"proj": params}, cfg)
    >>> {k: v.shape for k, v in ad["proj"].items()}
    {'lora_a': (3, 2), 'lora_b': (2, 4), 'magnitude': (4,)}
  """
  params = unbox(params)
  layouts = dict(layouts or {})
  dtype = config.adapter_dtype
  flat = {}
  for path in select_targets(params, config):
    module = get_path(params, path)
    w = module[weight_key(module)]
    layout = layouts.get(path) or default_layout(path, tuple(w.shape))
    mshape = layout.matrix_shape(tuple(w.shape))
    *stack_shape, i_dim, o_dim = mshape
    if config.r > min(i_dim, o_dim):
      raise ValueError(
          f"r={config.r} is larger than the module '{path}' allows: its kernel is"
          f" {i_dim} x {o_dim} (inputs x outputs), so the rank can be at most"
          f" {min(i_dim, o_dim)}. Lower r or exclude this module."
      )
    ka, kb = jax.random.split(_path_key(key, path))
    a_shape = (*stack_shape, i_dim, config.r)
    b_shape = (*stack_shape, config.r, o_dim)
    if config.init_lora_weights == "gaussian":
      a = core.gaussian_a(ka, a_shape, dtype)
    else:
      a = core.kaiming_uniform_a(ka, a_shape, dtype)
    if config.init_lora_weights is False:
      b = core.kaiming_uniform_a(kb, b_shape, dtype)
    else:
      b = jnp.zeros(b_shape, dtype)
    adapter = {"lora_a": a, "lora_b": b}
    if config.use_dora:
      w_mat = jnp.reshape(w, mshape)
      norm = _stacked(
          lambda w_, a_, b_: core.factored_column_norm(w_, a_, b_, config.scale),
          layout.stack,
      )(w_mat, a, b)
      adapter["magnitude"] = norm.astype(dtype)
    flat[path] = adapter
  return unflatten(flat)


def _merge_one(w, adapter, layout, scale, return_norm):
  mshape = layout.matrix_shape(tuple(w.shape))
  w_mat = jnp.reshape(w, mshape)
  a, b = adapter["lora_a"], adapter["lora_b"]
  m = adapter.get("magnitude")

  def one(w_, a_, b_, m_):
    v = w_.astype(jnp.float32) + core.lora_delta(a_, b_, scale)
    n = core.column_norm(v)
    out = v if m_ is None else v * core.dora_column_scale(m_, n)
    return out.astype(w_.dtype), n

  if m is None:
    merged, norm = _stacked(lambda w_, a_, b_: one(w_, a_, b_, None), layout.stack)(w_mat, a, b)
  else:
    merged, norm = _stacked(one, layout.stack)(w_mat, a, b, m)
  return jnp.reshape(merged, w.shape), norm


def _replace_weight(params, path, new_w):
  module = get_path(params, path)
  key = weight_key(module)
  old = module[key]
  value = old.replace_boxed(new_w) if isinstance(old, meta.AxisMetadata) else new_w
  return set_path(params, path, {**module, key: value})


def merge(params: Params, adapters: Mapping, config: LoraConfig, *, return_norms: bool = False):
  """Folds the adapters into the kernels: plain params the unmodified model runs.

  Each adapted kernel becomes ``W' = m ⊙ V' / ||V'||_c`` (DoRA) or ``V'``
  (LoRA), with ``V' = W0 + s·A B``, in the kernel's dtype.

  Args:
    params: the base ``params`` (boxed or not; boxes are kept).
    adapters: from :func:`init_adapters` (or training).
    config: the adapter config (for the scale).
    return_norms: also return ``{path: ||V'||_c}`` (nested like ``adapters``),
      which :func:`unmerge` needs to invert a DoRA merge.

  Returns:
    The merged params, or ``(merged, norms)``.
  """
  layouts = check_adapters(params, adapters)
  plain = unbox(params)
  out = params
  norms = {}
  for path, adapter in flatten_adapters(adapters).items():
    module = get_path(plain, path)
    merged, norm = _merge_one(module[weight_key(module)], adapter, layouts[path], config.scale, True)
    out = _replace_weight(out, path, merged)
    norms[path] = norm
  return (out, unflatten(norms)) if return_norms else out


def unmerge(merged: Params, adapters: Mapping, config: LoraConfig, norms: Mapping | None = None) -> Params:
  """Inverse of :func:`merge`: recovers the base params.

  LoRA needs only the adapters. DoRA also needs ``norms`` from
  ``merge(..., return_norms=True)``: a merged DoRA kernel keeps the direction of
  ``V'`` but not its length.

  Raises:
    ValueError: a norm whose shape is not its magnitude's ``[*stack, O]`` (naming the path).
  """
  if norms is not None:
    flat_adapters = flatten_adapters(adapters)
    for path, n in flatten_norms(norms).items():
      m = flat_adapters.get(path, {}).get("magnitude")
      if m is not None and tuple(jnp.shape(n)) != tuple(m.shape):
        raise ValueError(
            f"unmerge: the norm at '{path}' has shape {tuple(jnp.shape(n))}, but its DoRA"
            f" magnitude has {tuple(m.shape)}: pass the norms that merge(..., return_norms=True)"
            " returned for these adapters.")
  layouts = check_adapters(merged, adapters)
  plain = unbox(merged)
  flat_norms = flatten_norms(norms) if norms is not None else {}
  out = merged
  for path, adapter in flatten_adapters(adapters).items():
    module = get_path(plain, path)
    w = module[weight_key(module)]
    layout = layouts[path]
    mshape = layout.matrix_shape(tuple(w.shape))
    m = adapter.get("magnitude")
    if m is not None and path not in flat_norms:
      raise ValueError(
          f"Unmerging the DoRA kernel at '{path}' needs its norm ||W0 + sAB||_c from"
          " merge time (a merged DoRA weight keeps only its direction): call"
          " merge(..., return_norms=True) and pass the norms to unmerge."
      )
    fn = lambda w_, a_, b_, m_, n_: core.unmerge_kernel(w_, a_, b_, config.scale, m_, n_)
    if m is None:
      base = _stacked(lambda w_, a_, b_: core.unmerge_kernel(w_, a_, b_, config.scale), layout.stack)(
          jnp.reshape(w, mshape), adapter["lora_a"], adapter["lora_b"])
    else:
      base = _stacked(fn, layout.stack)(
          jnp.reshape(w, mshape), adapter["lora_a"], adapter["lora_b"], m, flat_norms[path])
    out = _replace_weight(out, path, jnp.reshape(base, w.shape))
  return out


def flatten_norms(norms: Mapping) -> dict[str, Array]:
  out = {}

  def visit(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(v, prefix + (str(k),))
    else:
      out["/".join(prefix)] = node

  visit(norms, ())
  return out


def decompose(
    params: Params, config: LoraConfig, *, layouts: Mapping[str, KernelLayout] | None = None
) -> tuple[dict, dict]:
  """The paper's decomposition ``W = m ⊙ V / ||V||_c`` of every targeted kernel.

  Returns:
    ``(magnitude, direction)``: nested dicts keyed by module path, with
    ``magnitude[path]: [*stack, O]`` float32 and ``direction[path]`` shaped like
    the kernel, each column (over the input axes) of unit norm.
  """
  params = unbox(params)
  layouts = dict(layouts or {})
  mags, dirs = {}, {}
  for path in select_targets(params, config):
    module = get_path(params, path)
    w = module[weight_key(module)]
    layout = layouts.get(path) or default_layout(path, tuple(w.shape))
    m, v = _stacked(core.decompose_kernel, layout.stack)(jnp.reshape(w, layout.matrix_shape(tuple(w.shape))))
    mags[path] = m
    dirs[path] = jnp.reshape(v, w.shape)
  return unflatten(mags), unflatten(dirs)


def combine(params: Params, adapters: Mapping) -> dict:
  """Params with each adapter's leaves inserted next to its kernel.

  This is the tree the Linen model sees under :func:`dora_jax.wrap`: ``nn.scan``
  and ``nn.remat`` then slice adapters together with their kernels.
  """
  out = params
  for path, adapter in flatten_adapters(adapters).items():
    module = get_path(out, path)
    clash = [k for k in adapter if k in module]
    if clash:
      raise ValueError(f"The module at '{path}' already has parameters named {clash}.")
    out = set_path(out, path, {**module, **adapter})
  return out


def split(combined: Params) -> tuple[dict, dict]:
  """Inverse of :func:`combine`: ``(params, adapters)``."""
  params, adapters = {}, {}

  def visit(node, prefix):
    if isinstance(node, Mapping) and "lora_a" in node:
      path = "/".join(prefix)
      adapters[path] = {k: v for k, v in node.items() if k in ADAPTER_KEYS}
      params[path] = {k: v for k, v in node.items() if k not in ADAPTER_KEYS}
      return
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(v, prefix + (str(k),))
    else:
      params["/".join(prefix)] = node

  visit(combined, ())
  return unflatten(params), unflatten(adapters)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(unbox(tree)))
