"""The NNX adapter layer: :class:`AdaptedLinear` and the base modules seen as ``W0 [I, O]``.

Part of :mod:`dora_jax.nnx` (which re-exports every name here): the adapter variable types
(:class:`Adapter`, :class:`FrozenAdapter`, :class:`BaseNorm`), the view of an
``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Conv`` / ``Embed`` kernel as a matrix
(:func:`kernel_matrix`, :func:`kernel_from_matrix`), the checks of what can be wrapped, and
the wrapper module whose forward is :func:`dora_jax.variants.output` (the one execution path
the Linen front-end shares). Walking a model and replacing modules is in :mod:`dora_jax.nnx`,
the functional route over ``nnx.split`` state in :mod:`dora_jax.nnx_functional`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import core
from dora_jax._logging import say_once
from dora_jax import initialize
from dora_jax import quant
from dora_jax import tree as tree_lib
from dora_jax import variants
from dora_jax.projection import ConvProjection, EmbedProjection, Projection, einsum_kernel_axes
from dora_jax.variants import dora

Array = jax.Array
_F32 = jnp.float32

SUPPORTED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
"""Module types :func:`apply_adapters` wraps (``nnx.Conv`` ungrouped and unmasked)."""


class Adapter(nnx.Variable):
  """A trainable adapter parameter (``lora_a``, ``lora_b``, ``magnitude``, VeRA's vectors).

  Deliberately not a subclass of ``nnx.Param``: the filter ``Adapter`` selects the
  adapters only and ``nnx.Param`` the (frozen) base only.
  """


class FrozenAdapter(nnx.Variable):
  """A frozen adapter leaf (VeRA's shared projections): saved with the adapters, never trained."""


class BaseNorm(nnx.Variable):
  """The cached ``||W0||²_c`` ``[O]`` float32 of a DoRA layer's frozen kernel (not trained)."""


# ---------------------------------------------------------------------------
# Base modules seen as [I, O]


def _kernel_perm(module: nnx.Module) -> tuple[int, ...] | None:
  """Axis permutation that brings an Einsum kernel to ``[ins..., outs...]`` (None: already)."""
  if not isinstance(module, nnx.Einsum):
    return None
  rhs, ins, outs = einsum_kernel_axes(module.einsum_str)
  perm = tuple(rhs.index(c) for c in ins + outs)
  return None if perm == tuple(range(len(perm))) else perm


def _weight(module: nnx.Module) -> nnx.Variable:
  """The module's base weight: ``embedding`` of an ``nnx.Embed``, else ``kernel``."""
  return module.embedding if isinstance(module, nnx.Embed) else module.kernel


def _matrix_dims(module: nnx.Module) -> tuple[int, int]:
  """``(I, O)`` of a supported module's kernel (a Conv's ``[*window, C_in, O]`` flattens to
  ``I = prod(window)·C_in``; an Embed's ``[V, D]`` is ``[I, O]``)."""
  shape = tuple(_weight(module).shape)
  if isinstance(module, (nnx.Conv, nnx.Embed)):
    return math.prod(shape[:-1]), shape[-1]
  if isinstance(module, nnx.Einsum):
    rhs, ins, outs = einsum_kernel_axes(module.einsum_str)
    size = dict(zip(rhs, shape))
    return math.prod(size[c] for c in ins), math.prod(size[c] for c in outs)
  if isinstance(module, nnx.LinearGeneral):
    k = len(module.in_features)
    return math.prod(shape[:k]), math.prod(shape[k:])
  return shape[0], shape[1]


def kernel_matrix(module: nnx.Module) -> Array:
  """The kernel (embedding) of a supported module as ``W0: [I, O]`` (a quantized kernel,
  :mod:`dora_jax.nnx_quant`, dequantized to its original dtype)."""
  w = _weight(module).get_value()
  if quant.is_quantized(w):
    w = quant.dequantize(w)
  perm = _kernel_perm(module)
  if perm is not None:
    w = jnp.transpose(w, perm)
  return w.reshape(_matrix_dims(module))


def kernel_from_matrix(module: nnx.Module, w_mat: Array) -> Array:
  """Inverse of :func:`kernel_matrix`: ``[I, O]`` back to the module's kernel shape."""
  shape = tuple(_weight(module).shape)
  perm = _kernel_perm(module)
  if perm is None:
    return w_mat.reshape(shape)
  w = w_mat.reshape(tuple(shape[p] for p in perm))
  return jnp.transpose(w, tuple(perm.index(i) for i in range(len(perm))))


def check_supported(module: Any, path: str = "") -> None:
  """Raises a ``ValueError`` naming the type if ``module`` cannot be wrapped."""
  where = f" at '{path}'" if path else ""
  if isinstance(module, AdaptedLinear):
    raise ValueError(f"The module{where} already has adapters; merge_adapters(model) first.")
  if not isinstance(module, SUPPORTED_TYPES):
    raise ValueError(
        f"The module{where} is a {type(module).__module__}.{type(module).__name__}:"
        " dora_jax.nnx adapts nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv and"
        " nnx.Embed. Exclude it"
        " (exclude_modules) or use the functional route (dora_jax.nnx.merged_state).")
  if isinstance(module, nnx.LinearGeneral) and module.batch_axis:
    raise ValueError(
        f"The nnx.LinearGeneral{where} has batch_axis={dict(module.batch_axis)}: one"
        " kernel per batch index is not supported by the module route; use the"
        " functional route (dora_jax.nnx.merged_state with kernel_layouts(model)).")
  if isinstance(module, nnx.Einsum):
    try:
      einsum_kernel_axes(module.einsum_str)
    except ValueError as e:
      raise ValueError(f"The nnx.Einsum{where}: {e}") from None
  if isinstance(module, nnx.Conv) and (module.feature_group_count != 1 or module.mask is not None):
    raise ValueError(
        f"The nnx.Conv{where} is grouped (feature_group_count={module.feature_group_count}) or"
        " masked: PEFT's Conv LoRA has no factored form for it. Exclude it, or use the"
        " functional route (dora_jax.nnx.merged_state).")


def _check_init(module: Any, config: Any, path: str) -> None:
  """PEFT's other inits (orthogonal, PiSSA, OLoRA) are for Linear-type modules only."""
  if ((getattr(config, "init_lora_weights", True) == "orthogonal"
       or getattr(config, "modifies_base", False)) and isinstance(module, (nnx.Conv, nnx.Embed))):
    raise ValueError(
        f"init_lora_weights={config.init_lora_weights!r} is for Linear-type modules only, but"
        f" '{path}' is an {type(module).__name__} (PEFT's Conv refuses this init, its"
        " Embedding silently uses the default one). Exclude it or use init_lora_weights=True.")


def conv_fn(module: nnx.Conv):
  """``conv(x, kernel)``: ``module``'s convolution without bias for a kernel of any output
  width, as the Linen ``nn.Conv`` with the same settings (one implementation of the padding
  and batch-axis rules: :func:`dora_jax.linen.conv_fn`)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from dora_jax import linen as dlinen  # pylint: disable=g-import-not-at-top
  extra = {}
  if module.conv_general_dilated is not jax.lax.conv_general_dilated:
    extra["conv_general_dilated"] = module.conv_general_dilated
  return dlinen.conv_fn(nn.Conv(
      features=module.out_features, kernel_size=module.kernel_size, strides=module.strides,
      padding=module.padding, input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation, use_bias=False, dtype=module.dtype,
      precision=module.precision, **extra))


def _projection(module: nnx.Module, x: Array, args, kwargs):
  if isinstance(module, nnx.Conv):
    return ConvProjection(conv_fn(module), tuple(module.kernel.shape))
  if isinstance(module, nnx.Embed):
    return EmbedProjection(*module.embedding.shape)
  if isinstance(module, nnx.Einsum):
    eq = kwargs.get("einsum_str") or (args[0] if args else None) or module.einsum_str
    if eq != module.einsum_str and einsum_kernel_axes(eq) != einsum_kernel_axes(module.einsum_str):
      raise ValueError(
          f"A call-time einsum_str '{eq}' must name the kernel's input and output axes as"
          f" the module's '{module.einsum_str}' does: the adapter is laid out for those.")
    return Projection.einsum(eq, x.shape, module.kernel.shape)
  if isinstance(module, nnx.LinearGeneral):
    k = len(module.in_features)
    return Projection.dense(x.ndim, module.axis, module.kernel.shape[:k], module.kernel.shape[k:])
  return Projection.dense(x.ndim, (-1,), module.kernel.shape[:1], module.kernel.shape[1:])


# ---------------------------------------------------------------------------
# The wrapper module


def _init_matrix_adapters(key: Array, mats: Mapping[str, Array], config: Any) -> dict:
  """Adapters for kernels given as ``{path: W0 [I, O]}``, by :func:`dora_jax.init_adapters_and_base`
  (the residual kernels of PiSSA / OLoRA under ``"residual"``).

  The draws equal ``init_adapters(key, params, config)`` on the model's own params
  (each module folds its path into ``key``); shared leaves are under ``"shared"``.
  """
  if "" in mats:  # the root module (then the only one)
    params = {"kernel": mats[""]}
  else:
    params = tree_lib.unflatten({p: {"kernel": w} for p, w in mats.items()})
  exact = dataclasses.replace(
      config, target_modules="|".join(re.escape(p) for p in mats), exclude_modules=None)
  residual, adapters = initialize.init_adapters_and_base(key, params, exact)
  changed = {}  # PiSSA / OLoRA: {path: W0 - s·A0 B0}
  if getattr(config, "modifies_base", False):
    changed = {p: residual["kernel"] if p == "" else tree_lib.get_path(residual, p)["kernel"]
               for p in mats}
  return {**tree_lib.flatten_adapters(adapters), variants.SHARED_KEY: tree_lib.shared_leaves(adapters),
          "residual": changed}


class AdaptedLinear(nnx.Module):
  """An ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` with an adapter of any method.

  Attributes:
    base_layer: the wrapped module (``kernel`` ``W0`` and ``bias`` stay ``nnx.Param``).
    <leaf names>: the method's per-layer leaves as :class:`Adapter` variables (LoRA:
      ``lora_a [I, r]``, ``lora_b [r, O]``), ``magnitude [O]`` for DoRA, and the shared
      leaves (VeRA: ``vera_A``, ``vera_B``) as :class:`FrozenAdapter` variables that
      every wrapper of the model references.
    base_norm: :class:`BaseNorm` ``||W0||²_c`` ``[O]`` (DoRA), cached at wrap time.
    lora_dropout: an ``nnx.Dropout`` on the adapter input (``None`` when the rate is 0).
    config: the adapter config. dora_path: see :mod:`dora_jax.variants.dora`.

  ``I``/``O`` are the products of the kernel's input/output axes; an Einsum kernel
  is first transposed to ``[inputs..., outputs...]`` (see :func:`kernel_matrix`).
  The forward is :func:`dora_jax.variants.output`, the function the Linen front-end calls.
  """

  def __init__(
      self,
      base_layer: nnx.Module,
      config: Any,
      *,
      rngs: nnx.Rngs,
      adapter: Mapping[str, Array] | None = None,
      shared: Mapping[str, nnx.Variable] | None = None,
      deterministic: bool = False,
      dora_path: str = dora.DEFAULT_PATH,
  ):
    """Wraps ``base_layer``.

    Args:
      base_layer: the module to adapt.
      config: rank, scale, dropout, method, DoRA switch, init.
      rngs: ``rngs.params()`` draws the init (unless ``adapter`` is given);
        the dropout forks ``rngs['dropout']``.
      adapter: one layer's adapter leaves (``{"lora_a": [I, r], ...}``) to start from
        instead of a fresh init.
      shared: the model's shared :class:`FrozenAdapter` variables (VeRA).
      deterministic: initial dropout mode (NNX's ``nnx.Dropout`` default is
        ``False``: active until ``model.eval()``).
      dora_path: ``"custom_vjp"`` (default, lean) or ``"factored"``; ``"merged"`` is
        the functional route (:func:`functional_apply`).

    Raises:
      ValueError: unsupported module, unknown ``dora_path``, adapter shapes that do not
        fit the kernel or the config.
    """
    check_supported(base_layer)
    if dora_path not in ("custom_vjp", "factored"):
      raise ValueError(f"dora_path must be 'custom_vjp' or 'factored' for the module route,"
                       f" got {dora_path!r}.")
    variant = variants.config_variant(config)
    i_dim, o_dim = _matrix_dims(base_layer)
    w_mat = kernel_matrix(base_layer)
    shared = dict(shared or {})
    if adapter is None:
      _check_init(base_layer, config, type(base_layer).__name__)
      made = _init_matrix_adapters(rngs.params(), {"layer": w_mat}, config)
      adapter = made["layer"]
      if made["residual"]:  # PiSSA / OLoRA: the base kernel becomes W0 - s·A0 B0, as in PEFT
        w_mat = made["residual"]["layer"]
        _weight(base_layer)[...] = kernel_from_matrix(base_layer, w_mat)
      shared = shared or {k: FrozenAdapter(v) for k, v in made[variants.SHARED_KEY].items()}
    missing = [k for k in variant.shared if k not in shared]
    if missing:
      raise ValueError(f"{variant.name} adapters need the shared leaves {missing}: pass shared=.")
    variants.check_matches_config(adapter, config, type(base_layer).__name__)
    layout = tree_lib.layout_from_adapter("layer", (i_dim, o_dim), adapter)
    del layout  # shapes checked against [I, O]
    self.base_layer = base_layer
    self.config = config
    self.dora_path = dora_path
    self.leaf_names = tuple(k for k in adapter)
    self.shared_names = tuple(variant.shared)
    for k, v in adapter.items():
      setattr(self, k, Adapter(jnp.asarray(v)))
    for k in variant.shared:
      setattr(self, k, shared[k])
    if config.use_dora:
      self.base_norm = BaseNorm(core.column_norm_sq(w_mat))
    else:
      self.base_norm = nnx.data(None)
      self.magnitude = nnx.data(None)
    if config.adapter_dropout > 0.0:
      self.lora_dropout = nnx.Dropout(config.adapter_dropout, deterministic=deterministic, rngs=rngs)
    else:
      self.lora_dropout = nnx.data(None)

  def adapter(self) -> dict[str, Array]:
    """This layer's adapter leaves as arrays."""
    return {k: getattr(self, k)[...] for k in self.leaf_names}

  def shared(self) -> dict[str, Array]:
    """The shared (frozen) leaves as arrays."""
    return {k: jax.lax.stop_gradient(getattr(self, k)[...]) for k in self.shared_names}

  def __call__(self, x: Array, *args, **kwargs) -> Array:
    """The adapted output; ``args``/``kwargs`` go to the base module (``einsum_str``, ``out_sharding``)."""
    base = self.base_layer
    y0 = base(x, *args, **kwargs)
    proj = _projection(base, x, args, kwargs)
    drop = self.lora_dropout
    dropped = drop is not None and not drop.deterministic
    if dropped and isinstance(base, nnx.Embed):
      say_once("dropout-embed", f"lora_dropout={self.config.adapter_dropout} is not applied to"
                " nnx.Embed lookups (integer ids), as in PEFT's Embedding LoRA.")
      dropped = False
    x_in = drop(x) if dropped else x
    bias = getattr(base, "bias", None)
    return variants.output(
        proj, y0, x_in, kernel_matrix(base), self.adapter(), self.config, shared=self.shared(),
        bias=None if bias is None else bias[...], dropped=dropped,
        path=self.dora_path, w0_norm_sq=None if self.base_norm is None else self.base_norm[...],
        w_is_stored=not quant.is_quantized(_weight(base).get_value()) and _kernel_perm(base) is None)

  def attend(self, query: Array) -> Array:
    """An adapted ``nnx.Embed``'s ``attend`` (a tied head): ``query · W'ᵀ``, as the Linen
    front-end runs ``Embed.attend`` on the merged weight.

    Raises:
      AttributeError: if the base module is not an ``nnx.Embed``.
    """
    base = self.base_layer
    if not isinstance(base, nnx.Embed):
      raise AttributeError(f"attend: the wrapped module is a {type(base).__name__}, not an nnx.Embed.")
    query, embedding = base.promote_dtype((query, self.merged_kernel()), dtype=base.dtype,
                                          inexact=True)
    return jnp.dot(query, embedding.T)

  def merged_kernel(self) -> Array:
    """``W'`` in the base kernel's shape and dtype (:func:`dora_jax.variants.merge_kernel`)."""
    w, _ = variants.merge_kernel(kernel_matrix(self.base_layer), self.adapter(), self.config,
                                 self.shared())
    return kernel_from_matrix(self.base_layer, w)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(str(k) for k in path)


def wrappers(model: nnx.Module) -> list[tuple[tuple, AdaptedLinear]]:
  """``(path, wrapper)`` of every :class:`AdaptedLinear` in ``model``."""
  return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, AdaptedLinear)]
