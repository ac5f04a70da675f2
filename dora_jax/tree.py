"""Parameter paths, target selection, and the adapters pytree that mirrors params.

A *module* in a params tree is a dict holding a ``kernel`` (Dense, DenseGeneral,
Einsum, Conv) or an ``embedding`` (Embed). Its path is the ``/``-joined keys
leading to it, e.g. ``model/layers/self_attn/q_proj``. The adapters tree has one
layer's adapter dict at the same path — the leaves its method variant declares
(LoRA: ``{"lora_a", "lora_b"}``), plus ``"magnitude"`` for DoRA — and, for methods
whose leaves are shared by all layers (VeRA), those under ``adapters["shared"]``.

A kernel is viewed as a matrix ``[*stack, I, O]``: ``stack`` leading axes added
by ``nn.scan``/``nn.vmap``, then the input axes (flattened to ``I``), then the
output axes (flattened to ``O``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from dora_jax import core
from dora_jax import variants
from dora_jax.variants import SHARED_KEY

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
    kind: the layer type family (see below).
  """

  stack: int = 0
  inputs: int = 1
  kind: str = dataclasses.field(default="linear", compare=False)
  """``"linear"`` (Dense, DenseGeneral, Einsum), ``"conv"`` or ``"embed"``: what
  ``target_modules="all-linear"`` selects from."""

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
  """``{path: adapter dict}`` for every layer's adapter (the shared leaves left out)."""
  out: dict[str, dict[str, Array]] = {}

  def visit(node, prefix):
    if variants.is_adapter(node):
      out["/".join(prefix)] = dict(node)
    elif isinstance(node, Mapping):
      for k, v in node.items():
        if not (not prefix and k == SHARED_KEY):
          visit(v, prefix + (str(k),))

  visit(adapters, ())
  return out


def shared_leaves(adapters: Mapping) -> dict[str, Array]:
  """The leaves all layers share (``adapters["shared"]``: VeRA's projections), or ``{}``."""
  return dict(adapters.get(SHARED_KEY, {})) if isinstance(adapters, Mapping) else {}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of a ``{"a/b/c": value}`` flattening into nested dicts."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


# ---------------------------------------------------------------------------
# Target selection


def _pattern_matches(path: str, spec) -> bool:
  if spec is None:
    return False
  if isinstance(spec, str):
    return re.fullmatch(spec, path) is not None
  return any(_name_matches(path, target) for target in spec)


def _name_matches(path: str, target: str) -> bool:
  t = target.replace(".", "/")
  return path == t or path.endswith("/" + t)


def _is_output_layer(path: str) -> bool:
  return path == "lm_head" or path.endswith("/lm_head")


def select_paths(candidates: Sequence[tuple[str, str]], config: Any) -> list[str]:
  """The one target rule of the library (Linen params and NNX modules alike).

  Args:
    candidates: ``(path, kind)`` or ``(path, kind, label)`` of every module with a kernel
      or embedding, in tree order; ``kind`` is ``"linear"``, ``"conv"``, ``"embed"`` or
      ``"other"``; ``label`` (default ``kind``) is what error messages show.
    config: an adapter config (``target_modules``, ``exclude_modules``).

  ``target_modules`` is a list of module-name suffixes (each must match at least one
  module), a regex matched in full against the ``/``-joined path, or ``"all-linear"``:
  every linear layer (Dense / DenseGeneral / Einsum, ``nnx.Linear`` / ``LinearGeneral``
  / ``Einsum``) except the output layer ``lm_head`` — PEFT's meaning.

  Raises:
    ValueError: if a listed name matches no module (near matches are named), or if
      nothing is selected (the existing paths are listed).
  """
  candidates = [(c[0], c[1], c[2] if len(c) > 2 else c[1]) for c in candidates]
  paths = [p for p, _, _ in candidates]
  spec = config.target_modules
  shown = "\n  ".join(f"{p or '<root>'} ({label})" for p, _, label in candidates[:60])
  shown += "\n  ..." if len(candidates) > 60 else ""
  listing = (f" Modules with a kernel or embedding:\n  {shown}\nUse name suffixes such as"
             " 'q_proj', a regex matched in full against these paths, or 'all-linear'.")
  if spec == "all-linear":
    selected = [p for p, kind, _ in candidates if kind == "linear" and not _is_output_layer(p)]
  elif isinstance(spec, str):
    selected = [p for p in paths if _pattern_matches(p, spec)]
  else:
    names = sorted({seg for p in paths for seg in p.split("/")})
    for target in spec:
      if not any(_name_matches(p, target) for p in paths):
        near = difflib.get_close_matches(target.replace(".", "/").split("/")[-1], names, n=3)
        raise ValueError(
            f"target_modules entry {target!r} matches no module"
            + (f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else "")
            + "; every listed name must match a module." + listing)
    selected = [p for p in paths if _pattern_matches(p, spec)]
  selected = [p for p in selected if not _pattern_matches(p, config.exclude_modules)]
  if not selected:
    hint = ""
    if spec == "all-linear" and any(kind == "other" for _, kind, _ in candidates):
      hint = (" Kernels marked (other) have more than 2 axes (nn.scan, DenseGeneral, Conv):"
              " pass layouts=dora_jax.kernel_layouts(model, *example_inputs) so dora_jax knows"
              " which are linear layers.")
    raise ValueError(
        f"target_modules={spec!r} (exclude_modules={config.exclude_modules!r}) matches no"
        " module." + hint + listing)
  return selected


def module_kind(path: str, module: Mapping, layouts: Mapping[str, "KernelLayout"] | None) -> str:
  """``kind`` of a params module for :func:`select_paths`: from its layout when known
  (:func:`dora_jax.kernel_layouts` records the layer type), else a 2-D ``kernel`` is
  linear and an ``embedding`` an embedding."""
  if "kernel" not in module:
    return "embed"
  if layouts and path in layouts:
    return layouts[path].kind
  return "linear" if module["kernel"].ndim == 2 else "other"


def select_targets(params: Params, config: Any, *,
                   layouts: Mapping[str, "KernelLayout"] | None = None) -> list[str]:
  """Paths of the params modules that ``config`` adapts, in tree order (:func:`select_paths`)."""
  params = unbox(params)
  cands = [(p, module_kind(p, m, layouts)) for p, m in iter_modules(params)]
  return select_paths(cands, config)


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


def _adapter_dims(path: str, adapter: Mapping) -> tuple[tuple[int, ...], int | None, int | None]:
  """``(stack shape, I or None, O or None)`` read off an adapter's leaves via their axes roles."""
  variant = variants.adapter_variant(adapter, path)
  stack, dims = None, {}
  for name, leaf in adapter.items():
    axes = variant.leaf_spec(name).axes
    n_stack = leaf.ndim - len(axes)
    if n_stack < 0:
      raise ValueError(f"Adapter at '{path}': {name} has shape {leaf.shape}, expected"
                       f" [*stack, {', '.join(axes)}].")
    if stack is None:
      stack = tuple(leaf.shape[:n_stack])
    if tuple(leaf.shape[:n_stack]) != stack:
      raise ValueError(f"Adapter at '{path}': its leaves disagree on the stacked axes"
                       f" ({ {k: v.shape for k, v in adapter.items()} }).")
    for role, size in zip(axes, leaf.shape[n_stack:]):
      if dims.setdefault(role, size) != size:
        raise ValueError(
            f"Adapter at '{path}': {name} has shape {tuple(leaf.shape)}, but the other leaves"
            f" give {role} size {dims[role]} ({ {k: tuple(v.shape) for k, v in adapter.items()} }).")
  return stack or (), dims.get("in"), dims.get("out")


def layout_from_adapter(path: str, kernel_shape: tuple[int, ...], adapter: Mapping) -> KernelLayout:
  """Recover the layout of a kernel from its adapter's shapes, checking they fit."""
  stack_shape, i_dim, o_dim = _adapter_dims(path, adapter)
  stack = len(stack_shape)
  if tuple(kernel_shape[:stack]) != stack_shape:
    raise ValueError(
        f"Adapter at '{path}' has stacked axes {stack_shape} but the kernel has"
        f" shape {kernel_shape}: these adapters were made for another model."
    )
  rest = kernel_shape[stack:]
  for k in range(1, len(rest)):
    if ((i_dim is None or math.prod(rest[:k]) == i_dim)
        and (o_dim is None or math.prod(rest[k:]) == o_dim)):
      return KernelLayout(stack, k)
  shapes = {k: tuple(v.shape) for k, v in adapter.items()}
  raise ValueError(
      f"Adapter at '{path}' ({shapes}) does not fit the kernel of shape {kernel_shape}:"
      f" I x O = {i_dim} x {o_dim} is not a split of its axes. These adapters were made"
      " for another model or config."
  )


def check_adapters(params: Params, adapters: Mapping, config: Any = None) -> dict[str, KernelLayout]:
  """Checks that every adapter sits on a kernel it fits (and, given ``config``, was
  made with its method and DoRA switch); returns their layouts.

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
    if config is not None:
      variants.check_matches_config(adapter, config, path)  # = check_config_matches
    kernel = module[weight_key(module)]
    layouts[path] = layout_from_adapter(path, tuple(kernel.shape), adapter)
  return layouts


def check_config_matches(adapters: Mapping, config: Any) -> None:
  """Checks that ``config`` describes ``adapters`` as far as arrays can tell: its method's
  leaves are there, and DoRA adapters (a ``magnitude`` leaf) need ``use_dora=True``.

  ``lora_alpha`` and ``use_rslora`` (the scale) leave no trace in the arrays and cannot
  be checked here: take them from where the adapters were saved (``load_adapters`` and
  ``import_peft`` return the saved config).

  Raises:
    ValueError: naming the first module whose adapter disagrees with ``config``.
  """
  for path, adapter in flatten_adapters(adapters).items():
    variants.check_matches_config(adapter, config, path)


# ---------------------------------------------------------------------------
# Stacked application of the per-kernel math


def _stacked(fn: Callable, stack: int, in_axes=0) -> Callable:
  for _ in range(stack):
    fn = jax.vmap(fn, in_axes=in_axes)
  return fn


def _path_key(key: Array, path: str) -> Array:
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def kernel_value(module: Mapping, path: str = "") -> Array:
  """A module's kernel (or embedding) as an array: a quantized kernel (:mod:`dora_jax.quant`)
  is dequantized to its original dtype (QDoRA's norms and merges use the dequantized ``W0``).

  Raises:
    ValueError: for an integer or other non-float kernel that did not come through
      :func:`dora_jax.quantize` (adapter math on it would be silently wrong).
  """
  from dora_jax import quant  # pylint: disable=g-import-not-at-top  (quant builds on tree)

  w = module[weight_key(module)]
  if quant.is_quantized(w):
    return quant.dequantize(w)
  quant.check_float_kernel(w, path or weight_key(module))
  return w


def _kernel_matrix(module: Mapping, layout: KernelLayout, path: str = "") -> tuple[Array, tuple[int, ...]]:
  w = kernel_value(module, path)
  return jnp.reshape(w, layout.matrix_shape(tuple(w.shape))), tuple(w.shape)


def _replace_weight(params, path, new_w):
  module = get_path(params, path)
  key = weight_key(module)
  old = module[key]
  value = old.replace_boxed(new_w) if isinstance(old, meta.AxisMetadata) else new_w
  return set_path(params, path, {**module, key: value})


def _per_layer(fn: Callable, layout: KernelLayout, shared: Mapping) -> Callable:
  """``fn(w_mat, adapter, shared, *rest)`` vmapped over the stacked axes (``shared`` broadcast)."""
  one = lambda w_, ad_, *rest: fn(w_, ad_, shared, *rest)
  return _stacked(one, layout.stack)


def merge(params: Params, adapters: Mapping, config: Any, *, return_norms: bool = False):
  """Folds the adapters into the kernels: plain params the unmodified model runs.

  Each adapted kernel becomes ``W' = m ⊙ V / ||V||_c`` (DoRA) or ``V`` (otherwise),
  ``V = W0 + ΔW`` with the variant's ``ΔW`` (LoRA: ``s·A B``), in the kernel's dtype.

  Args:
    params: the base ``params`` (boxed or not; boxes are kept).
    adapters: from :func:`init_adapters` (or training).
    config: the adapter config the adapters were made with.
    return_norms: also return ``{path: ||V||_c}`` (nested like ``adapters``),
      which :func:`unmerge` needs to invert a DoRA merge.

  Returns:
    The merged params, or ``(merged, norms)``. Quantized kernels (:func:`dora_jax.quantize`)
    come back dequantized, adapted or not: the result runs the unmodified model.

  Raises:
    ValueError: if an adapter does not fit its kernel or was made with another config.
  """
  layouts = check_adapters(params, adapters, config)
  shared = shared_leaves(adapters)
  plain = unbox(params)
  out = params
  norms = {}
  for path, adapter in flatten_adapters(adapters).items():
    w_mat, shape = _kernel_matrix(get_path(plain, path), layouts[path], path)
    mc = variants.module_config(config, path)
    fn = lambda w_, ad_, sh_: variants.merge_kernel(w_, ad_, mc, sh_)
    merged, norm = _per_layer(fn, layouts[path], shared)(w_mat, adapter)
    out = _replace_weight(out, path, jnp.reshape(merged, shape))
    norms[path] = norm
  from dora_jax import quant  # pylint: disable=g-import-not-at-top  (quant builds on tree)

  out = quant.dequantize_params(out)  # a quantized base merges into full-precision params
  return (out, unflatten(norms)) if return_norms else out


def unmerge(merged: Params, adapters: Mapping, config: Any, norms: Mapping | None = None) -> Params:
  """Inverse of :func:`merge`: recovers the base params.

  LoRA needs only the adapters. DoRA also needs ``norms`` from
  ``merge(..., return_norms=True)``: a merged DoRA kernel keeps the direction of
  ``V`` but not its length.

  Raises:
    ValueError: if a DoRA adapter's norm is missing or of the wrong shape (naming the path).
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
  layouts = check_adapters(merged, adapters, config)
  shared = shared_leaves(adapters)
  plain = unbox(merged)
  flat_norms = flatten_norms(norms) if norms is not None else {}
  out = merged
  for path, adapter in flatten_adapters(adapters).items():
    w_mat, shape = _kernel_matrix(get_path(plain, path), layouts[path], path)
    mc = variants.module_config(config, path)
    if variants.MAGNITUDE in adapter:
      if path not in flat_norms:
        raise ValueError(
            f"Unmerging the DoRA kernel at '{path}' needs its norm ||W0 + ΔW||_c from"
            " merge time (a merged DoRA weight keeps only its direction): call"
            " merge(..., return_norms=True) and pass the norms to unmerge.")
      norm = flat_norms[path]
      if tuple(norm.shape) != tuple(adapter[variants.MAGNITUDE].shape):
        raise ValueError(
            f"unmerge: the norm at '{path}' has shape {tuple(norm.shape)}, expected"
            f" {tuple(adapter[variants.MAGNITUDE].shape)} (the magnitude's): pass the norms"
            " merge(..., return_norms=True) returned for these adapters.")
      fn = lambda w_, ad_, sh_, n_: variants.unmerge_kernel(w_, ad_, mc, sh_, n_)
      base = _per_layer(fn, layouts[path], shared)(w_mat, adapter, norm)
    else:
      fn = lambda w_, ad_, sh_: variants.unmerge_kernel(w_, ad_, mc, sh_)
      base = _per_layer(fn, layouts[path], shared)(w_mat, adapter)
    out = _replace_weight(out, path, jnp.reshape(base, shape))
  return out


def flatten_norms(norms: Mapping) -> dict[str, Array]:
  """``{path: norm}`` of a nested norms tree (from :func:`merge`)."""
  return traverse_util.flatten_dict(dict(norms), sep="/") if norms else {}


def decompose(
    params: Params, config: Any, *, layouts: Mapping[str, KernelLayout] | None = None
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
  for path in select_targets(params, config, layouts=layouts):
    module = get_path(params, path)
    w = module[weight_key(module)]
    layout = layouts.get(path) or default_layout(path, tuple(w.shape))
    m, v = _stacked(core.decompose_kernel, layout.stack)(jnp.reshape(w, layout.matrix_shape(tuple(w.shape))))
    mags[path] = m
    dirs[path] = jnp.reshape(v, w.shape)
  return unflatten(mags), unflatten(dirs)


def combine(params: Params, adapters: Mapping) -> dict:
  """Params with each layer's adapter leaves inserted next to its kernel.

  This is the tree the Linen model sees under :func:`dora_jax.wrap`: ``nn.scan``
  and ``nn.remat`` then slice adapters together with their kernels. Shared leaves
  are not inserted (the front-end passes them separately).
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
  names = variants.layer_leaf_names()
  flat = traverse_util.flatten_dict(dict(combined), sep="/")
  params, adapters = {}, {}
  for key, value in flat.items():
    head, _, leaf = key.rpartition("/")
    if leaf in names and variants.is_adapter(get_path(combined, head) if head else combined):
      adapters[key] = value
    else:
      params[key] = value
  return unflatten(params), unflatten(adapters)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(unbox(tree)))
