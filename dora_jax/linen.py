"""Running Flax Linen models with adapters, without changing the model code.

:func:`wrap` inserts the adapter leaves next to their kernels (so ``nn.scan``
and ``nn.remat`` slice them with the params) and intercepts the ``__call__`` of
every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` that holds an adapter:
the module computes its own base output ``y0 = x W0 + b`` and the interceptor
adds the low-rank term and the DoRA column scale, without forming ``W'``:

    LoRA:  y = y0 + s·(drop(x) A) B
    DoRA:  y = y0 + (g − 1) ⊙ (x' W0) + g ⊙ s·(drop(x) A) B,  g = m / sg(||W0 + sAB||_c)

with ``x' W0 = y0 − b`` without dropout (PEFT's semantics: the bias is never
rescaled). ``wrap(..., dora_path=...)`` picks how DoRA layers run in training:
``"custom_vjp"`` (default: a backward that keeps ``y`` instead of ``u``),
``"factored"`` (autodiff) or ``"merged"`` (materialize ``W'``); see
:mod:`dora_jax.variants.dora`. The per-layer math is :func:`dora_jax.variants.output`,
the same function the NNX front-end calls. ``nn.Conv`` (ungrouped, unmasked) and
``nn.Embed`` lookups run factored too, with PEFT's Conv / Embedding LoRA forms
(:class:`~dora_jax.projection.ConvProjection`, :class:`~dora_jax.projection.EmbedProjection`;
autodiff, adapter dropout on the conv input, none on embedding ids as in PEFT). The
others (``nn.ConvTranspose``, grouped or masked ``nn.Conv``, ``Embed.attend``,
``DenseGeneral`` with ``batch_dims``, batched ``Einsum``) run on the merged weight ``W'``,
where adapter dropout cannot apply (logged once per type).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dora_jax import core
from dora_jax._logging import _said as _said_merged  # tests clear it to see a notice again
from dora_jax._logging import say_once
from dora_jax import quant
from dora_jax import tree as tree_lib
from dora_jax import variants
from dora_jax.projection import ConvProjection, EmbedProjection, Projection, einsum_kernel_axes
from dora_jax.variants import dora

Array = jax.Array

NORM_KEY = "w0_norm_sq"
"""Params key of a cached ``||W0||²_c`` (see :func:`base_norms`), next to the kernel."""

_FACTORED_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)
_ADAPTABLE_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose, nn.Embed)


def _say_merged_once(kind: str, why: str) -> None:
  say_once(kind, f"{kind} modules run on the merged weight W' ({why}); the factored path"
           " covers Dense, DenseGeneral, Einsum, Conv (ungrouped) and Embed lookups.")


# ---------------------------------------------------------------------------
# Where the input and output axes of a module's kernel are


def _einsum_equation(module: nn.Einsum, args, kwargs) -> str:
  return kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str


def _einsum_inputs(module: nn.Einsum, args, kwargs) -> int | None:
  """Input axes of a factorable Einsum kernel; None for a batched einsum."""
  eq = _einsum_equation(module, args, kwargs)
  try:
    rhs, ins, outs = einsum_kernel_axes(eq)
  except ValueError:
    return None
  if ins + outs != rhs:
    raise ValueError(
        f"Einsum '{eq}' at '{'/'.join(module.scope.path)}': its kernel axes are not ordered"
        " inputs-then-outputs, which the adapters tree assumes ([*inputs, *outputs]"
        " flattened to [I, O]). Reorder the kernel axes or exclude the module.")
  return len(ins)


def _module_inputs(module: nn.Module, kernel_ndim: int, args, kwargs) -> int | None:
  """Number of leading input axes of the module's (unstacked) kernel, or None."""
  if isinstance(module, nn.Dense):
    return 1
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      return None
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return len(axis)
  if isinstance(module, nn.Einsum):
    return _einsum_inputs(module, args, kwargs)
  if isinstance(module, nn.Embed):
    return 1
  if isinstance(module, (nn.Conv, nn.ConvTranspose)):
    return kernel_ndim - 1
  return None


def _layer_kind(mod: nn.Module) -> str:
  """``KernelLayout.kind``: what ``all-linear`` selects and how the PEFT format lays it out."""
  if isinstance(mod, nn.Embed):
    return "embed"
  if isinstance(mod, _FACTORED_TYPES):
    return "linear"
  if isinstance(mod, nn.ConvTranspose):
    return "conv_transpose"
  if getattr(mod, "feature_group_count", 1) > 1:
    return "grouped_conv"
  return "conv"


def kernel_layouts(model: nn.Module, *args, method=None, **kwargs) -> dict[str, tree_lib.KernelLayout]:
  """Traces ``model.init(*args)`` (shapes only) to find every kernel's layout.

  Needed by :func:`dora_jax.init_adapters` for kernels that are not plain 2-D:
  stacked by ``nn.scan`` / ``nn.vmap``, ``DenseGeneral`` with several input or
  output axes, ``Einsum``, ``Conv``.

  Returns:
    ``{module_path: KernelLayout(stack, inputs)}``.
  """
  seen: dict[str, tuple[int, int | None]] = {}
  kinds: dict[str, str] = {}

  def record(next_fun, a, kw, context):
    out = next_fun(*a, **kw)
    mod = context.module
    if isinstance(mod, _ADAPTABLE_TYPES) and context.method_name in ("__call__", "attend"):
      key = "embedding" if isinstance(mod, nn.Embed) else "kernel"
      if mod.has_variable("params", key):
        w = tree_lib.unbox(mod.get_variable("params", key))
        seen["/".join(mod.scope.path)] = (w.ndim, _module_inputs(mod, w.ndim, a, kw))
        kinds["/".join(mod.scope.path)] = _layer_kind(mod)
    return out

  def init(rng):
    with nn.intercept_methods(record):
      return model.init(rng, *args, method=method, **kwargs)

  variables = jax.eval_shape(init, jax.random.key(0))
  params = tree_lib.unbox(variables["params"])
  layouts = {}
  for path, module in tree_lib.iter_modules(params):
    if path not in seen:
      continue
    ndim, inputs = seen[path]
    full = module[tree_lib.weight_key(module)].ndim
    if inputs is None:
      continue
    layouts[path] = tree_lib.KernelLayout(stack=full - ndim, inputs=inputs, kind=kinds[path])
  return layouts


# ---------------------------------------------------------------------------
# The interceptor


def _dropout(x: Array, rate: float, rng: Array) -> Array:
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _adapter_of(module: nn.Module) -> dict[str, Array]:
  return {k: module.get_variable("params", k) for k in variants.layer_leaf_names()
          if module.has_variable("params", k)}


def _where(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def _projection(module, x: Array, kernel: Array, inputs: int, args, kwargs) -> Projection:
  if isinstance(module, nn.Einsum):
    return Projection.einsum(_einsum_equation(module, args, kwargs), x.shape, kernel.shape)
  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  else:
    axis = (-1,)
  return Projection.dense(x.ndim, axis, kernel.shape[:inputs], kernel.shape[inputs:])


def _cached_norm(module: nn.Module, o_dim: int) -> Array | None:
  if not module.has_variable("params", NORM_KEY):
    return None
  w0_norm_sq = module.get_variable("params", NORM_KEY)
  if w0_norm_sq.shape != (o_dim,):
    raise ValueError(
        f"Cached {NORM_KEY} at '{_where(module)}' has shape {w0_norm_sq.shape},"
        f" expected ({o_dim},): were the base norms made for another model?")
  return w0_norm_sq


def _own_params(module: nn.Module, drop: Mapping) -> dict:
  """The module's own params: without adapter leaves and cached norms, kernels dequantized."""
  own = {}
  for k, v in module.variables["params"].items():
    if k in drop or k == NORM_KEY:
      continue
    v = tree_lib.unbox(v)
    own[k] = quant.dequantize(v) if quant.is_quantized(v) else v
  return own


def _base_call(module, next_fun, context, args, kwargs, adapter: Mapping) -> Any:
  """The module's own output ``y0``; a quantized kernel is dequantized for this call only.

  Inside the step, one layer at a time under ``nn.scan``; under ``jax.checkpoint`` so the
  backward re-dequantizes ``W0`` for ``∇x`` instead of keeping a full-precision copy of
  every layer's kernel (what QLoRA's backward does too).
  """
  key = "embedding" if isinstance(module, nn.Embed) else "kernel"
  if not (module.has_variable("params", key)
          and quant.is_quantized(tree_lib.unbox(module.get_variable("params", key)))):
    return next_fun(*args, **kwargs)
  own_q = {k: tree_lib.unbox(v) for k, v in module.variables["params"].items()
           if k not in adapter and k != NORM_KEY}
  clone, method = module.clone(parent=None), context.method_name

  def run(own_q, args):
    own = jax.tree.map(lambda v: quant.dequantize(v) if quant.is_quantized(v) else v, own_q,
                       is_leaf=quant.is_quantized)
    return clone.apply({"params": own}, *args, method=method, **kwargs)

  return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(own_q, args)


def _factored_call(module, next_fun, context, args, kwargs, config, shared, inputs: int,
                   dropout_on: bool, dora_path: str) -> Array:
  ad = _adapter_of(module)
  kernel = tree_lib.kernel_value(
      {"kernel": tree_lib.unbox(module.get_variable("params", "kernel"))}, _where(module))
  x = args[0] if args else kwargs["inputs"]
  layout = tree_lib.layout_from_adapter(_where(module), tuple(kernel.shape), ad)
  i_dim, o_dim = layout.matrix_shape(tuple(kernel.shape))
  if layout.inputs != inputs:
    raise ValueError(
        f"Adapter at '{_where(module)}' ({ {k: tuple(v.shape) for k, v in ad.items()} }) does"
        f" not fit its {type(module).__name__} kernel {kernel.shape} with {inputs} input axes."
        " Build the adapters with layouts=dora_jax.kernel_layouts(model, *example_inputs).")
  proj = _projection(module, x, kernel, inputs, args, kwargs)
  y0 = _base_call(module, next_fun, context, args, kwargs, ad)
  x_in = _dropout(x, config.adapter_dropout, module.make_rng("dropout")) if dropout_on else x
  bias = (tree_lib.unbox(module.get_variable("params", "bias"))
          if module.has_variable("params", "bias") else None)
  if dropout_on and dora_path == "custom_vjp" and variants.MAGNITUDE in ad:
    say_once("dropout-factored", "adapter dropout is active: DoRA layers run the 'factored'"
             " path (autodiff keeps u = x W0 + ΔW x per layer; the lean 'custom_vjp' path"
             " needs dropout off).")
  stored = not quant.is_quantized(tree_lib.unbox(module.get_variable("params", "kernel")))
  return variants.output(proj, y0, x_in, kernel.reshape(i_dim, o_dim), ad, config,
                         shared=shared, bias=bias, dropped=dropout_on,
                         path="factored" if dora_path == "factored" else "custom_vjp",
                         w0_norm_sq=_cached_norm(module, o_dim), w_is_stored=stored)


def conv_fn(module: nn.Conv) -> Callable[[Array, Array], Array]:
  """``conv(x, kernel)``: ``module``'s convolution (strides, padding, dilation, dtype)
  without bias, for a kernel ``[*window, C_in, n]`` of any ``n`` output channels."""
  base = module.clone(parent=None, use_bias=False, mask=None)

  def conv(x, kernel):
    return base.clone(features=kernel.shape[-1]).apply({"params": {"kernel": kernel}}, x)

  return conv


def factorable_conv(module: Any) -> bool:
  """Whether a Linen or NNX Conv has a factored adapter forward (ungrouped, unmasked)."""
  return module.feature_group_count == 1 and module.mask is None


def _conv_or_embed_call(module, next_fun, context, args, kwargs, config, shared,
                        dropout_on: bool) -> Array:
  """PEFT's Conv / Embedding LoRA (and DoRA) forward from the module's own output ``y0``."""
  ad = _adapter_of(module)
  is_embed = isinstance(module, nn.Embed)
  key = "embedding" if is_embed else "kernel"
  w = _own_params(module, ad)[key]
  layout = tree_lib.layout_from_adapter(_where(module), tuple(w.shape), ad)
  i_dim, o_dim = layout.matrix_shape(tuple(w.shape))
  if layout.inputs != w.ndim - 1:
    raise ValueError(
        f"Adapter at '{_where(module)}' ({ {k: tuple(v.shape) for k, v in ad.items()} }) does"
        f" not fit its {type(module).__name__} kernel {w.shape} as [{i_dim}, {o_dim}]."
        " Build the adapters with layouts=dora_jax.kernel_layouts(model, *example_inputs).")
  x = args[0] if args else kwargs["inputs"]
  y0 = _base_call(module, next_fun, context, args, kwargs, ad)
  if is_embed:
    proj = EmbedProjection(*w.shape)
    if dropout_on:
      say_once("dropout-embed", f"lora_dropout={config.adapter_dropout} is not applied to"
               " nn.Embed lookups (integer ids), as in PEFT's Embedding LoRA.")
    dropout_on, x_in = False, x
  else:
    proj = ConvProjection(conv_fn(module), tuple(w.shape))
    x_in = _dropout(x, config.adapter_dropout, module.make_rng("dropout")) if dropout_on else x
  bias = None if is_embed or not module.use_bias else _own_params(module, ad)["bias"]
  return variants.output(proj, y0, x_in, w.reshape(i_dim, o_dim), ad, config, shared=shared,
                         bias=bias, dropped=dropout_on, path="factored",
                         w0_norm_sq=_cached_norm(module, o_dim))


def _merged_call(module, context, args, kwargs, config, shared, chosen: bool = False,
                 dropout_on: bool = False) -> Any:
  key = "embedding" if isinstance(module, nn.Embed) else "kernel"
  ad = _adapter_of(module)
  own = _own_params(module, ad)
  w = own[key]
  layout = tree_lib.layout_from_adapter(_where(module), tuple(w.shape), ad)
  w_mat = w.reshape(layout.matrix_shape(tuple(w.shape)))
  merged, _ = variants.merge_kernel(w_mat, ad, config, shared)
  own[key] = merged.reshape(w.shape)
  if not chosen:
    _say_merged_once(type(module).__name__, "no factored forward for this layer type")
  if dropout_on:
    say_once(f"dropout-merged-{type(module).__name__}",
             f"lora_dropout={config.adapter_dropout} is NOT applied to {type(module).__name__}"
             f" modules (e.g. '{_where(module)}'): they run on the merged weight W', which cannot"
             " drop the adapter's input only.")
  return module.clone(parent=None).apply({"params": own}, *args, method=context.method_name, **kwargs)


def _interceptor(config, dora_path: str, shared, dropout_active: bool, next_fun, args, kwargs,
                 context):
  module = context.module
  marker = variants.config_variant(config).marker
  if (context.method_name not in ("__call__", "attend")
      or not isinstance(module, _ADAPTABLE_TYPES)):
    return next_fun(*args, **kwargs)
  if not module.has_variable("params", marker):
    return _base_call(module, next_fun, context, args, kwargs, {})
  config = variants.module_config(config, _where(module))  # rank_pattern / alpha_pattern
  dropout_on = (dropout_active and config.adapter_dropout > 0.0
                and module.scope.has_rng("dropout"))
  is_dora = module.has_variable("params", variants.MAGNITUDE)
  if dora_path == "merged" and is_dora and not dropout_on:
    return _merged_call(module, context, args, kwargs, config, shared, chosen=True)
  if isinstance(module, _FACTORED_TYPES) and context.method_name == "__call__":
    kernel = module.get_variable("params", "kernel")
    inputs = _module_inputs(module, tree_lib.unbox(kernel).ndim, args, kwargs)
    if inputs is not None:
      return _factored_call(module, next_fun, context, args, kwargs, config, shared, inputs,
                            dropout_on, dora_path)
  if context.method_name == "__call__" and (
      isinstance(module, nn.Embed) or (isinstance(module, nn.Conv) and factorable_conv(module))):
    return _conv_or_embed_call(module, next_fun, context, args, kwargs, config, shared, dropout_on)
  return _merged_call(module, context, args, kwargs, config, shared, dropout_on=dropout_on)


def base_norms(params, adapters: Mapping) -> dict:
  """``||W0||²_c`` of the kernel under every DoRA adapter, computed once in float32.

  The base kernels are frozen, so their squared column norms never change; pass
  the result as ``apply(..., base_norms=...)`` (:func:`wrap`) to skip that pass
  over every ``W0`` in each step. It is :func:`dora_jax.core.column_norm_sq`, the
  computation the magnitudes start from, so ``g = m / n`` is exactly 1 at init.

  Returns:
    ``{path: {"w0_norm_sq": [*stack, O] float32}}`` mirroring the adapters.
  """
  params = tree_lib.unbox(params.get("params", params) if isinstance(params, Mapping) else params)
  layouts = tree_lib.check_adapters(params, adapters)
  flat = {}
  for path, adapter in tree_lib.flatten_adapters(adapters).items():
    if variants.MAGNITUDE not in adapter:
      continue
    w = tree_lib.kernel_value(tree_lib.get_path(params, path))
    w_mat = jnp.reshape(w, layouts[path].matrix_shape(tuple(w.shape)))
    flat[path] = {NORM_KEY: tree_lib._stacked(core.column_norm_sq, layouts[path].stack)(w_mat)}
  return tree_lib.unflatten(flat)


def _insert_norms(params: Mapping, norms: Mapping) -> dict:
  """Params (adapters combined) with each cached ``||W0||²_c`` next to its kernel."""
  out = params
  flat = {path[: -len(NORM_KEY) - 1] if path != NORM_KEY else "": v
          for path, v in tree_lib.flatten_norms(norms).items()}
  for path, norm in flat.items():
    try:
      target = tree_lib.get_path(out, path)
    except (KeyError, TypeError):
      target = None
    if not isinstance(target, Mapping) or variants.MAGNITUDE not in target:
      raise ValueError(f"base_norms has an entry at '{path}', where the params have no DoRA adapter.")
    out = tree_lib.set_path(out, path, {**target, NORM_KEY: norm})
  return out


MODE_KWARGS = {"deterministic": False, "train": True, "training": True, "is_training": True}
"""Model-call keywords the adapter dropout follows: name -> the value meaning 'train'."""


def adapter_dropout_active(adapter_dropout: bool | None, rngs: Any, kwargs: Mapping) -> bool:
  """Whether the adapter dropout runs in one ``apply`` call (the rule of :func:`wrap`).

  ``adapter_dropout`` ``True``/``False`` decides; ``None`` follows the model's own call:
  a Python-bool ``deterministic=`` (``train=``, ``training=``, ``is_training=``) keyword
  passed to the model decides (``deterministic=True`` → off), and without one the dropout
  runs when ``rngs`` has a ``"dropout"`` key (Flax's convention).

  Raises:
    ValueError: ``adapter_dropout=True`` without a ``"dropout"`` rng.
  """
  has_rng = isinstance(rngs, Mapping) and "dropout" in rngs
  if adapter_dropout is not None:
    if adapter_dropout and not has_rng:
      raise ValueError("adapter_dropout=True needs a dropout key: pass rngs={'dropout': key}.")
    return bool(adapter_dropout)
  for name, train_value in MODE_KWARGS.items():
    value = kwargs.get(name)
    if isinstance(value, bool):
      return has_rng and value == train_value
  return has_rng


def wrap(apply_fn: Callable, config: Any, *, dora_path: str = dora.DEFAULT_PATH) -> Callable:
  """Runs a Linen model's ``apply`` with adapters.

  Args:
    apply_fn: ``model.apply`` (or any function taking a variables dict first).
    config: the adapter config the adapters were made with (:class:`~dora_jax.LoraConfig`,
      :class:`~dora_jax.VeraConfig`).
    dora_path: how DoRA layers (Dense, DenseGeneral, Einsum) run; all give the
      same outputs and gradients up to rounding (:mod:`dora_jax.variants.dora`):

      - ``"custom_vjp"`` (default, the lean path): ``y0 + (g − 1)·(x W0) + g·ΔW x``
        from the module's own output ``y0``, with a backward that keeps ``g·u = y − b``
        (the output ``y`` itself without a bias) instead of ``u = x W0 + ΔW x``
        (``∇m = Σ dy ⊙ g·u / m``; exact for zero magnitudes too, with or without a bias) and the norm from the kernel's own dtype with float32
        accumulation. With adapter dropout active it runs ``"factored"`` (said once).
      - ``"factored"``: the same forward differentiated by autodiff (keeps ``u``).
      - ``"merged"``: materialize ``W' = m ⊙ V / ||V||_c`` and run the module on it
        (the reference; an ``[I, O]`` temporary per layer). With adapter dropout
        active it runs ``"factored"`` (a merged weight cannot drop the adapter's
        input only).

      Layers without DoRA (LoRA, VeRA) run ``y0 + s·(x A) B``; on ``"custom_vjp"`` with a
      hand-written backward that contracts ``∇A = xᵀ∇h`` and ``∇B = s·hᵀ∇y`` straight into
      the leaves' layouts (faster on XLA:CPU than autodiff's orientation), on the other
      paths by autodiff (the reference).

  Raises:
    ValueError: for an unknown ``dora_path``; at call time, for adapters that do not
      fit the params or were made with another method or DoRA switch.

  Returns:
    ``apply(params, adapters, *args, rngs=None, base_norms=None, adapter_dropout=None, **kwargs)``. ``params`` is the
    ``params`` collection, or a full variables dict with a ``"params"`` key
    (other collections such as ``batch_stats`` or a ``cache`` are passed through;
    ``mutable=`` is forwarded to ``apply_fn``).
    ``base_norms`` (optional, from :func:`base_norms`) caches ``||W0||²_c``.
    ``adapter_dropout`` (optional ``bool``) switches the adapter dropout for the call;
    by default (``None``) it follows the model: a ``deterministic=`` / ``train=`` (or
    ``training=``, ``is_training=``) Python bool passed to the model decides, else it is
    active when ``rngs`` has a ``"dropout"`` key, as Flax's own dropout conventions go
    (:func:`adapter_dropout_active`). It applies to Dense, DenseGeneral, Einsum and Conv
    inputs; never to Embed ids (as PEFT); layers on the merged weight cannot apply it (logged).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, dora_jax
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
    >>> model, x = MLP(), jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> cfg = dora_jax.LoraConfig(r=2, target_modules=["hidden", "out"], use_dora=True)
    >>> adapters = dora_jax.init_adapters(jax.random.key(1), params, cfg)
    >>> y = dora_jax.wrap(model.apply, cfg)(params, adapters, x)
    >>> bool(jnp.allclose(y, model.apply({"params": params}, x), atol=1e-6))
    True
  """

  if dora_path not in dora.PATHS:
    raise ValueError(f"dora_path must be one of {list(dora.PATHS)}, got {dora_path!r}.")
  variants.config_variant(config)

  def apply(params, adapters, *args, rngs=None, base_norms=None, adapter_dropout=None, **kwargs):
    if isinstance(params, Mapping) and "params" in params and isinstance(params["params"], Mapping):
      variables = dict(params)
    else:
      variables = {"params": params}
    tree_lib.check_adapters(variables["params"], adapters, config)
    shared = {k: jax.lax.stop_gradient(v) for k, v in tree_lib.shared_leaves(adapters).items()}
    variables["params"] = tree_lib.combine(variables["params"], adapters)
    if base_norms is not None:
      variables["params"] = _insert_norms(variables["params"], base_norms)
    active = adapter_dropout_active(adapter_dropout, rngs, kwargs)
    with nn.intercept_methods(functools.partial(_interceptor, config, dora_path, shared, active)):
      return apply_fn(variables, *args, rngs=rngs, **kwargs)

  return apply
