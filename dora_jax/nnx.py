"""Adapters for Flax NNX models: module wrapping and a functional route over state.

Module route (train in place, NNX style)::

    model = dora_jax.nnx.apply_adapters(model, config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=dora_jax.nnx.Adapter)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, dora_jax.nnx.Adapter))(model, x, y)
    optimizer.update(model, grads)
    model = dora_jax.nnx.merge_adapters(model)   # plain nnx.Linear / ... with W'

:func:`apply_adapters` replaces each targeted ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Einsum``, ``nnx.Conv`` (ungrouped) and ``nnx.Embed`` by an :class:`AdaptedLinear` that keeps the original module as
``base_layer`` (its ``kernel`` and ``bias`` stay ``nnx.Param``) and holds
``lora_a [I, r]``, ``lora_b [r, O]`` and, for DoRA, ``magnitude [O]`` as
:class:`Adapter` variables: ``nnx.state(model, Adapter)`` and
``nnx.Optimizer(..., wrt=Adapter)`` see the adapters only. The forward is the
factored one of :mod:`dora_jax.linen` (PEFT semantics, ``W'`` never formed):

    LoRA:  y = y0 + s·(drop(x) A) B
    DoRA:  y = y0 + (g − 1) ⊙ (x' W0) + g ⊙ s·(drop(x) A) B,  g = m / sg(||W0 + sAB||_c)

with ``y0`` from the base module's own ``__call__`` and ``x' W0 = y0 − b`` without
dropout (the bias is never rescaled). The adapter dropout is an ``nnx.Dropout``
(rng stream ``'dropout'``), switched by ``model.train()`` / ``model.eval()`` /
``nnx.view(model, deterministic=...)``.

Functional route (the merged fallback, any NNX model)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapters = dora_jax.init_adapters(key, param_dict(params), config,
                                      layouts=kernel_layouts(model))
    y = functional_apply(graphdef, (params, rest), adapters, config, x)

:func:`param_dict` gives the ``Param`` state as the nested ``{str: ...}`` dict that
:func:`dora_jax.init_adapters`, :func:`dora_jax.merge` and :func:`dora_jax.decompose`
take; :func:`merged_state` folds adapters into an ``nnx.State``.

QLoRA / QDoRA: :func:`quantize` (from :mod:`dora_jax.nnx_quant`) turns the linear modules
into quantized ones before :func:`apply_adapters`; their kernels are dequantized inside
each call and :func:`merge_adapters` returns full-precision ``W'``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import core
from dora_jax._logging import _said  # tests clear it to see a notice again
from dora_jax._logging import say_once
from dora_jax import initialize
from dora_jax import quant
from dora_jax import tree as tree_lib
from dora_jax import variants
from dora_jax.config import LoraConfig
from dora_jax.projection import ConvProjection, EmbedProjection, Projection, einsum_kernel_axes
from dora_jax.variants import dora

Array = jax.Array
_F32 = jnp.float32

SUPPORTED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
"""Module types :func:`apply_adapters` wraps (``nnx.Conv`` ungrouped and unmasked)."""

_LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


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
        path=self.dora_path, w0_norm_sq=None if self.base_norm is None else self.base_norm[...])

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


# ---------------------------------------------------------------------------
# Walking and editing the module graph


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(str(k) for k in path)


def _child(node: Any, key: Any) -> Any:
  if isinstance(node, (collections.abc.Mapping, collections.abc.Sequence)):
    return node[key]
  return getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
  if isinstance(node, (collections.abc.MutableMapping, collections.abc.MutableSequence)):
    node[key] = value
  elif isinstance(node, (collections.abc.Mapping, collections.abc.Sequence)):
    raise ValueError(f"Cannot replace entry {key!r} of an immutable {type(node).__name__}.")
  else:
    setattr(node, key, value)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> nnx.Module:
  """Puts ``new`` at ``path`` in place; returns the (possibly new) root."""
  if not path:
    return new
  node = model
  for k in path[:-1]:
    node = _child(node, k)
  _set_child(node, path[-1], new)
  return model


def _has_weight(module: Any) -> bool:
  return any(isinstance(getattr(module, k, None), nnx.Variable) for k in tree_lib.WEIGHT_KEYS)


def _candidates(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """Modules with a kernel or embedding, and wrappers; never what is inside a wrapper."""
  mods = list(nnx.iter_modules(model))
  wrapped = [p for p, m in mods if isinstance(m, AdaptedLinear)]
  inside = lambda p: any(len(p) > len(w) and p[: len(w)] == w for w in wrapped)
  return [(p, m) for p, m in mods
          if (isinstance(m, AdaptedLinear) or _has_weight(m)) and not inside(p)]


def _kind(module: Any) -> str:
  if isinstance(module, AdaptedLinear):
    return "adapted"  # "all-linear" skips it; naming it explicitly is an error (check_supported)
  if isinstance(module, _LINEAR_TYPES):
    return "linear"
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    return "conv"
  return "embed" if isinstance(module, nnx.Embed) else "other"


def select_modules(model: nnx.Module, config: Any) -> list[tuple[tuple, nnx.Module]]:
  """``(path, module)`` of the modules ``config`` targets: :func:`dora_jax.tree.select_paths`,
  the rule the Linen front-end uses, on the paths ``layers/0/q_proj`` (attribute names and
  list indices). ``"all-linear"`` takes every ``nnx.Linear``/``LinearGeneral``/``Einsum``
  but an ``lm_head``.

  Raises:
    ValueError: if nothing (or a listed name) matches, with the module paths / near matches.
  """
  cands = _candidates(model)
  by_path = {_path_str(p): (p, m) for p, m in cands}
  chosen = tree_lib.select_paths(
      [(_path_str(p), _kind(m), type(m).__name__) for p, m in cands], config)
  return [by_path[c] for c in chosen]


def model_deterministic(model: nnx.Module) -> bool | None:
  """The host model's train/eval mode, as ``model.train()`` / ``model.eval()`` set it.

  ``True`` (eval) when every submodule with a boolean ``deterministic`` or
  ``use_running_average`` attribute (``nnx.Dropout``, ``nnx.BatchNorm``,
  ``nnx.MultiHeadAttention``, ...) has it ``True``; ``False`` when any has it ``False``;
  ``None`` when the model has no such module (its mode leaves no trace).
  """
  flags = []
  for _, m in nnx.iter_modules(model):
    for attr in ("deterministic", "use_running_average"):
      v = getattr(m, attr, None)
      if isinstance(v, bool):
        flags.append(v)
  return all(flags) if flags else None


def apply_adapters(
    model: nnx.Module, config: Any, rngs: nnx.Rngs, *, deterministic: bool | None = None,
    dora_path: str = dora.DEFAULT_PATH,
) -> nnx.Module:
  """Wraps every module ``config`` targets in an :class:`AdaptedLinear`, in place.

  Args:
    model: an NNX model.
    config: what to adapt and how (:class:`~dora_jax.LoraConfig`, :class:`~dora_jax.VeraConfig`).
    rngs: ``rngs.params()`` draws one key ``k``; the adapters equal
      ``dora_jax.init_adapters(k, param_dict(model), config, layouts=kernel_layouts(model))``.
      The adapter dropouts fork ``rngs['dropout']``.
    deterministic: initial mode of the adapter dropouts; ``None`` (default) follows the
      model (:func:`model_deterministic`: a model put in ``eval()`` gets deterministic
      adapter dropouts; one without any mode-carrying module gets NNX's default, active).
      Afterwards ``model.train()`` / ``model.eval()`` switch them with the model's own.
      PiSSA / OLoRA inits (``config.modifies_base``) replace each targeted kernel by the
      residual ``W0 − s·A0 B0`` in place, as PEFT's ``get_peft_model`` does; keep
      :func:`adapter_dict` right after this call to export a LoRA for the original base
      (:func:`dora_jax.export_peft` ``initial_adapters=``).
    dora_path: how DoRA layers run (:mod:`dora_jax.variants.dora`; default the lean
      ``"custom_vjp"``), as in :func:`dora_jax.wrap`.

  Returns:
    ``model`` (the wrapper itself if the root module is targeted).

  Raises:
    ValueError: nothing matches (the message lists the paths); a targeted module is
      not an ``nnx.Linear``/``LinearGeneral``/``Einsum`` (the message names its type)
      or is already adapted; ``r`` exceeds what a kernel allows.
  """
  chosen = select_modules(model, config)
  for p, m in chosen:
    check_supported(m, _path_str(p))
    _check_init(m, config, _path_str(p))
  if deterministic is None:
    deterministic = bool(model_deterministic(model))
  key = rngs.params()
  made = _init_matrix_adapters(key, {_path_str(p): kernel_matrix(m) for p, m in chosen}, config)
  shared = {k: FrozenAdapter(v) for k, v in made[variants.SHARED_KEY].items()}
  for p, m in chosen:
    if _path_str(p) in made["residual"]:  # PiSSA / OLoRA rewrite the base kernel, as PEFT does
      _weight(m)[...] = kernel_from_matrix(m, made["residual"][_path_str(p)])
    wrapper = AdaptedLinear(m, variants.module_config(config, _path_str(p)), rngs=rngs, adapter=made[_path_str(p)], shared=shared,
                            deterministic=deterministic, dora_path=dora_path)
    model = _replace(model, p, wrapper)
  return model


def wrappers(model: nnx.Module) -> list[tuple[tuple, AdaptedLinear]]:
  """``(path, wrapper)`` of every :class:`AdaptedLinear` in ``model``."""
  return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, AdaptedLinear)]


def merge_adapters(model: nnx.Module) -> nnx.Module:
  """Replaces each :class:`AdaptedLinear` by a copy of its base module holding ``W'``, in place.

  The result has the structure (and state paths) of the model before
  :func:`apply_adapters`: export it, or run it without dora_jax. A quantized base module
  (:func:`quantize`) becomes its plain type with the full-precision ``W'``.

  Returns:
    ``model`` (a new object if the root itself was a wrapper).
  """
  from dora_jax import nnx_quant  # pylint: disable=g-import-not-at-top  (imports this module)

  for p, w in wrappers(model):
    if nnx_quant.is_quantized_module(w.base_layer):  # QLoRA / QDoRA: W' in full precision
      merged = nnx_quant.plain_copy(w.base_layer, kernel=w.merged_kernel())
    else:
      merged = nnx.clone(w.base_layer)
      _weight(merged)[...] = w.merged_kernel()
    model = _replace(model, p, merged)
  return model


def adapter_state(model: nnx.Module) -> nnx.State:
  """``nnx.state(model, Adapter)``: the adapters only, as an ``nnx.State``."""
  return nnx.state(model, Adapter)


def adapter_dict(model: nnx.Module) -> dict:
  """The adapters as the nested ``{str: ...}`` dict of :func:`dora_jax.init_adapters`.

  ``{path: {"lora_a", "lora_b"[, "magnitude"]}}`` at each wrapper's path (and the
  shared leaves under ``"shared"``), ready for :func:`dora_jax.merge` on
  :func:`param_dict` or for checkpointing.
  """
  out = {}
  shared = {}
  for p, w in wrappers(model):
    out[_path_str(p)] = w.adapter()
    shared.update({k: getattr(w, k)[...] for k in w.shared_names})
  out = tree_lib.unflatten(out) if "" not in out else out[""]
  if shared:
    out[variants.SHARED_KEY] = shared
  return out


# ---------------------------------------------------------------------------
# The functional route over nnx.split state


def _str_keys(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def param_dict(model_or_state: nnx.Module | nnx.State) -> dict:
  """The ``nnx.Param`` values as a nested dict with ``str`` keys (list indices too).

  This is the params tree :func:`dora_jax.init_adapters`, :func:`dora_jax.merge`,
  :func:`dora_jax.unmerge` and :func:`dora_jax.decompose` take. Given a model with
  wrappers, each ``base_layer`` is lifted to its wrapper's path: the result has the
  layout of the unwrapped model.
  """
  if isinstance(model_or_state, nnx.Module):
    lifted = {_path_str(p) for p, _ in wrappers(model_or_state)}
    flat = {}
    for path, value in nnx.to_flat_state(nnx.state(model_or_state, nnx.Param)):
      keys = [str(k) for k in path]
      for i in range(len(keys) - 1, 0, -1):  # drop 'base_layer' right below a wrapper
        if keys[i] == "base_layer" and "/".join(keys[:i]) in lifted:
          del keys[i]
      flat["/".join(keys)] = value.get_value()
    return tree_lib.unflatten(flat)
  return _str_keys(nnx.to_pure_dict(nnx.filter_state(model_or_state, nnx.Param)))


def kernel_layouts(model: nnx.Module) -> dict[str, tree_lib.KernelLayout]:
  """``{path: KernelLayout}`` of the model's ``nnx.LinearGeneral`` and ``nnx.Einsum`` kernels.

  Pass to :func:`dora_jax.init_adapters` / :func:`dora_jax.decompose` with
  :func:`param_dict`. A ``LinearGeneral``'s ``batch_axis`` are stacked axes.
  Einsum kernels whose axes are not ``[inputs..., outputs...]`` have no reshape
  layout and are left out (the module route handles them).
  """
  out = {}
  for p, m in nnx.iter_modules(model):
    if isinstance(m, AdaptedLinear):
      m = m.base_layer
    if isinstance(m, nnx.LinearGeneral):
      out[_path_str(p)] = tree_lib.KernelLayout(len(m.batch_axis), len(m.in_features))
    elif isinstance(m, nnx.Einsum):
      try:
        rhs, ins, outs = einsum_kernel_axes(m.einsum_str)
      except ValueError:
        continue
      if rhs == ins + outs:
        out[_path_str(p)] = tree_lib.KernelLayout(0, len(ins))
    elif isinstance(m, nnx.Linear):
      out[_path_str(p)] = tree_lib.KernelLayout(0, 1)
    elif isinstance(m, nnx.Conv):
      out[_path_str(p)] = tree_lib.KernelLayout(0, m.kernel.ndim - 1, kind="conv")
  return out


def merged_state(state: nnx.State, adapters: Mapping, config: LoraConfig) -> nnx.State:
  """A copy of ``state`` with each adapted kernel replaced by ``W'`` (:func:`dora_jax.merge`).

  Args:
    state: from ``nnx.split(model)`` (or ``nnx.split(model, nnx.Param, ...)``) of the
      unwrapped model; other variables pass through.
    adapters: ``{path: {"lora_a", "lora_b"[, "magnitude"]}}`` with ``str`` paths,
      e.g. from :func:`dora_jax.init_adapters` on :func:`param_dict` or :func:`adapter_dict`.
    config: the adapter config.
  """
  merged = tree_lib.merge(param_dict(state), adapters, config)
  updates = {}
  for path in tree_lib.flatten_adapters(adapters):
    module = tree_lib.get_path(merged, path)
    key = tree_lib.weight_key(module)
    updates[f"{path}/{key}" if path else key] = module[key]
  out = jax.tree.map(lambda v: v, state)
  nnx.replace_by_pure_dict(out, tree_lib.unflatten(updates))
  return out


def functional_apply(graphdef: nnx.GraphDef, state: nnx.State | Sequence[nnx.State],
                     adapters: Mapping, config: LoraConfig, *args, **kwargs) -> Any:
  """Calls the model rebuilt from ``graphdef`` and the merged state: the merged route.

  ``state`` is one ``nnx.State`` or the tuple of states from ``nnx.split``; the
  adapters are merged into the first. Pure (usable under ``jax.jit`` / ``jax.grad``
  w.r.t. ``adapters``); changes the call makes to the module's state (rng counts,
  batch statistics) are dropped.
  """
  states = tuple(state) if isinstance(state, (tuple, list)) else (state,)
  module = nnx.merge(graphdef, merged_state(states[0], adapters, config), *states[1:])
  return module(*args, **kwargs)


# QLoRA / QDoRA: quantized linear modules (defined in dora_jax.nnx_quant, which imports this module).
from dora_jax.nnx_quant import (  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
    QuantizedEinsum,
    QuantizedLinear,
    QuantizedLinearGeneral,
    dequantize,
    is_quantized_module,
    quantize,
)
