"""Running Flax Linen models with adapters, without changing the model code.

:func:`wrap` inserts the adapter leaves next to their kernels (so ``nn.scan``
and ``nn.remat`` slice them with the params) and intercepts the ``__call__`` of
every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` that holds an adapter:
the module computes its own base output ``y0 = x W0 + b`` and the interceptor
adds the low-rank term and the DoRA column scale, without forming ``W'``:

    LoRA:  y = y0 + s·(drop(x) A) B
    DoRA:  y = y0 + (g − 1) ⊙ (x' W0) + g ⊙ s·(drop(x) A) B,  g = m / sg(||W0 + sAB||_c)

with ``x' W0 = y0 − b`` without dropout (PEFT's semantics: the bias is never
rescaled). Other adapted modules (``nn.Conv``, ``nn.Embed``, ``DenseGeneral``
with ``batch_dims``, batched ``Einsum``) run on the merged weight ``W'``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import opt_einsum

from dora_jax import core
from dora_jax import tree as tree_lib
from dora_jax.config import ADAPTER_KEYS, LoraConfig

Array = jax.Array
logger = logging.getLogger("dora_jax")

_FACTORED_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)
_ADAPTABLE_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose, nn.Embed)
_said_merged: set[str] = set()


def _say_merged_once(kind: str, why: str) -> None:
  if kind not in _said_merged:
    _said_merged.add(kind)
    logger.warning(
        "dora_jax: %s modules run on the merged weight W' (%s); the factored path"
        " covers Dense, DenseGeneral and Einsum.", kind, why)


# ---------------------------------------------------------------------------
# Where the input and output axes of a module's kernel are


def _einsum_parts(module: nn.Einsum, args, kwargs) -> tuple[str, str, str] | None:
  """``(lhs, rhs, out)`` letters of an Einsum call, ellipses expanded."""
  eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
  x = args[0] if args else kwargs["inputs"]
  kernel_shape = tuple(module.shape)
  operands, out, _ = opt_einsum.parser.parse_einsum_input(
      (eq.replace(" ", ""), jax.ShapeDtypeStruct(x.shape, x.dtype),
       jax.ShapeDtypeStruct(kernel_shape, x.dtype)))
  lhs, rhs = operands.split(",")
  return lhs, rhs, out


def _einsum_factorable(lhs: str, rhs: str, out: str) -> bool:
  ins = [c for c in rhs if c not in out]
  outs = [c for c in rhs if c in out]
  return (all(c in lhs for c in ins) and not any(c in lhs for c in outs)
          and list(rhs) == ins + outs and bool(ins) and bool(outs))


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
    lhs, rhs, out = _einsum_parts(module, args, kwargs)
    if not _einsum_factorable(lhs, rhs, out):
      return None
    return sum(c not in out for c in rhs)
  if isinstance(module, nn.Embed):
    return 1
  if isinstance(module, (nn.Conv, nn.ConvTranspose)):
    return kernel_ndim - 1
  return None


def kernel_layouts(model: nn.Module, *args, method=None, **kwargs) -> dict[str, tree_lib.KernelLayout]:
  """Traces ``model.init(*args)`` (shapes only) to find every kernel's layout.

  Needed by :func:`dora_jax.init_adapters` for kernels that are not plain 2-D:
  stacked by ``nn.scan`` / ``nn.vmap``, ``DenseGeneral`` with several input or
  output axes, ``Einsum``, ``Conv``.

  Returns:
    ``{module_path: KernelLayout(stack, inputs)}``.
  """
  seen: dict[str, tuple[int, int | None]] = {}

  def record(next_fun, a, kw, context):
    out = next_fun(*a, **kw)
    mod = context.module
    if isinstance(mod, _ADAPTABLE_TYPES) and context.method_name in ("__call__", "attend"):
      key = "embedding" if isinstance(mod, nn.Embed) else "kernel"
      if mod.has_variable("params", key):
        w = tree_lib.unbox(mod.get_variable("params", key))
        seen["/".join(mod.scope.path)] = (w.ndim, _module_inputs(mod, w.ndim, a, kw))
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
    layouts[path] = tree_lib.KernelLayout(stack=full - ndim, inputs=inputs)
  return layouts


# ---------------------------------------------------------------------------
# The interceptor


def _dropout(x: Array, rate: float, rng: Array) -> Array:
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _adapter_of(module: nn.Module) -> dict[str, Array]:
  return {k: module.get_variable("params", k) for k in ADAPTER_KEYS
          if module.has_variable("params", k)}


def _factored_call(module, next_fun, args, kwargs, config: LoraConfig, inputs: int,
                   dropout_on: bool) -> Array:
  ad = _adapter_of(module)
  a, b, m = ad["lora_a"], ad["lora_b"], ad.get("magnitude")
  kernel = tree_lib.unbox(module.get_variable("params", "kernel"))
  x = args[0] if args else kwargs["inputs"]
  i_dim, r = a.shape
  o_dim = b.shape[-1]
  out_shape = kernel.shape[inputs:]
  if math.prod(kernel.shape[:inputs]) != i_dim or math.prod(out_shape) != o_dim:
    raise ValueError(
        f"Adapter at '{'/'.join(module.scope.path)}' (lora_a {a.shape}, lora_b"
        f" {b.shape}) does not fit its {type(module).__name__} kernel {kernel.shape}"
        f" with {inputs} input axes. Build the adapters with"
        " layouts=dora_jax.kernel_layouts(model, *example_inputs).")
  scale = config.scale

  y0 = next_fun(*args, **kwargs)
  dt = y0.dtype
  xd = x
  if dropout_on:
    xd = _dropout(x, config.lora_dropout, module.make_rng("dropout"))

  # Low-rank path: (x A) B in the module's output layout, float32 accumulation.
  a_c, b_c = a.astype(dt), b.astype(dt)
  if isinstance(module, nn.Einsum):
    lhs, rhs, out = _einsum_parts(module, args, kwargs)
    ins = "".join(c for c in rhs if c not in out)
    outs = "".join(c for c in rhs if c in out)
    free = "".join(c for c in lhs if c not in ins)
    rl = next(c for c in "RSTUVWXYZrstuvwxyz" if c not in lhs + rhs + out)
    h = jnp.einsum(f"{lhs},{ins}{rl}->{free}{rl}", xd.astype(dt),
                   a_c.reshape(*kernel.shape[:inputs], r), preferred_element_type=jnp.float32)
    low = jnp.einsum(f"{free}{rl},{rl}{outs}->{out}", h.astype(dt),
                     b_c.reshape(r, *out_shape), preferred_element_type=jnp.float32)
    bshape = [kernel.shape[rhs.index(c)] if c in outs else 1 for c in out]
    perm = sorted(range(len(outs)), key=lambda i: out.index(outs[i]))
    to_out = lambda v: jnp.transpose(v.reshape(out_shape), perm).reshape(bshape)
    base_of = lambda xx: jnp.einsum(f"{lhs},{rhs}->{out}", xx.astype(dt), kernel.astype(dt),
                                    preferred_element_type=jnp.float32)
  else:
    if isinstance(module, nn.DenseGeneral):
      axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
      axis = tuple(ax % x.ndim for ax in axis)
    else:
      axis = (x.ndim - 1,)
    xm = jnp.moveaxis(xd, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    xm = xm.reshape(*xm.shape[: x.ndim - len(axis)], i_dim).astype(dt)
    h = jax.lax.dot_general(xm, a_c, (((xm.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    low = jnp.dot(h.astype(dt), b_c, preferred_element_type=jnp.float32)
    low = low.reshape(*low.shape[:-1], *out_shape)
    bshape = [1] * (y0.ndim - len(out_shape)) + list(out_shape)
    to_out = lambda v: v.reshape(bshape)
    base_of = lambda xx: jnp.dot(xx, kernel.reshape(i_dim, o_dim).astype(dt),
                                 preferred_element_type=jnp.float32).reshape(low.shape)
  low = scale * low

  if m is None:
    return (y0.astype(jnp.float32) + low).astype(dt)

  norm = core.factored_column_norm(kernel.reshape(i_dim, o_dim), a, b, scale)
  g = to_out(core.dora_column_scale(m, norm))
  bias = (tree_lib.unbox(module.get_variable("params", "bias"))
          if module.has_variable("params", "bias") else None)
  bias_b = None if bias is None else to_out(bias.astype(jnp.float32))
  if dropout_on:  # (x' W0) on the dropped input, bias-free
    base = base_of(xm if not isinstance(module, nn.Einsum) else xd)
  else:
    base = y0.astype(jnp.float32)
    if bias_b is not None:
      base = base - bias_b
  return (y0.astype(jnp.float32) + (g - 1.0) * base + g * low).astype(dt)


def _merged_call(module, context, args, kwargs, config: LoraConfig) -> Any:
  key = "embedding" if isinstance(module, nn.Embed) else "kernel"
  ad = _adapter_of(module)
  w = tree_lib.unbox(module.get_variable("params", key))
  layout = tree_lib.layout_from_adapter("/".join(module.scope.path), tuple(w.shape), ad)
  w_mat = w.reshape(layout.matrix_shape(tuple(w.shape)))
  merged = core.merge_kernel(w_mat, ad["lora_a"], ad["lora_b"], config.scale, ad.get("magnitude"))
  own = {k: tree_lib.unbox(v) for k, v in module.variables["params"].items() if k not in ADAPTER_KEYS}
  own[key] = merged.reshape(w.shape)
  _say_merged_once(type(module).__name__, "no factored forward for this layer type")
  return module.clone(parent=None).apply({"params": own}, *args, method=context.method_name, **kwargs)


def _interceptor(config: LoraConfig, next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name not in ("__call__", "attend")
      or not isinstance(module, _ADAPTABLE_TYPES)
      or not module.has_variable("params", "lora_a")):
    return next_fun(*args, **kwargs)
  dropout_on = config.lora_dropout > 0.0 and module.scope.has_rng("dropout")
  if isinstance(module, _FACTORED_TYPES) and context.method_name == "__call__":
    kernel = module.get_variable("params", "kernel")
    inputs = _module_inputs(module, tree_lib.unbox(kernel).ndim, args, kwargs)
    if inputs is not None:
      return _factored_call(module, next_fun, args, kwargs, config, inputs, dropout_on)
  return _merged_call(module, context, args, kwargs, config)


def wrap(apply_fn: Callable, config: LoraConfig) -> Callable:
  """Runs a Linen model's ``apply`` with adapters.

  Args:
    apply_fn: ``model.apply`` (or any function taking a variables dict first).
    config: the adapter config the adapters were made with.

  Returns:
    ``apply(params, adapters, *args, rngs=None, **kwargs)``. ``params`` is the
    ``params`` collection, or a full variables dict with a ``"params"`` key
    (other collections such as ``batch_stats`` are passed through).
    The adapter dropout (``config.lora_dropout``) is active when ``rngs`` has
    a ``"dropout"`` key, as Flax's own dropout conventions go.

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

  def apply(params, adapters, *args, rngs=None, **kwargs):
    if isinstance(params, Mapping) and "params" in params and isinstance(params["params"], Mapping):
      variables = dict(params)
    else:
      variables = {"params": params}
    tree_lib.check_adapters(variables["params"], adapters)
    variables["params"] = tree_lib.combine(variables["params"], adapters)
    with nn.intercept_methods(functools.partial(_interceptor, config)):
      return apply_fn(variables, *args, rngs=rngs, **kwargs)

  return apply
