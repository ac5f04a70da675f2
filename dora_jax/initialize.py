"""Creating adapters: :func:`init_adapters`, and :func:`init_adapters_and_base` for inits
that change the base weights (PiSSA, OLoRA), over the params tree of :mod:`dora_jax.tree`."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dora_jax import variants
from dora_jax.tree import (
    KernelLayout,
    Params,
    _kernel_matrix,
    _path_key,
    _replace_weight,
    _stacked,
    default_layout,
    get_path,
    module_kind,
    select_targets,
    unbox,
    unflatten,
    weight_key,
)
from dora_jax.variants import SHARED_KEY

Array = jax.Array


def init_adapters(
    key: Array,
    params: Params,
    config: Any,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict:
  """Creates adapters for every module that ``config`` targets.

  Args:
    key: a PRNG key. Each module's adapter draws from ``fold_in(key, crc32(path))``,
      so it does not depend on which other modules are targeted; shared leaves
      (VeRA) come from the config's own seed (``projection_prng_key``).
    params: the Linen ``params`` collection (boxed or not).
    config: the adapter config (:class:`~dora_jax.LoraConfig`, :class:`~dora_jax.VeraConfig`).
    layouts: ``{path: KernelLayout}`` for kernels that are not plain 2-D
      (stacked by ``nn.scan``, ``DenseGeneral``, ``Einsum``, ``Conv``); see
      :func:`dora_jax.kernel_layouts`.

  Returns:
    A nested dict mirroring ``params``: at each targeted module path the variant's
    leaves (LoRA: ``{"lora_a": [*stack, I, r], "lora_b": [*stack, r, O]}``) plus
    ``"magnitude": [*stack, O]`` for DoRA, in ``config.adapter_dtype``; shared leaves
    under ``"shared"``. With the default init the adapted model equals the base model.

  Raises:
    ValueError: nothing (or a listed name) matches; a kernel needs a layout; ``r`` is
      larger than a kernel allows; an init that changes the base weights (PiSSA, OLoRA:
      use :func:`init_adapters_and_base`); PEFT's other inits on a conv or embedding.

  Example:
    >>> import jax, flax.linen as nn, dora_jax
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jax.numpy.ones((1, 3)))["params"]
    >>> cfg = dora_jax.LoraConfig(r=2, target_modules=".*", use_dora=True)
    >>> ad = dora_jax.init_adapters(jax.random.key(1), {"proj": params}, cfg)
    >>> {k: v.shape for k, v in ad["proj"].items()}
    {'lora_a': (3, 2), 'lora_b': (2, 4), 'magnitude': (4,)}
  """
  if getattr(config, "modifies_base", False):
    raise ValueError(
        f"init_lora_weights={config.init_lora_weights!r} changes the base weights (it moves"
        " s·A0 B0 out of W0): call dora_jax.init_adapters_and_base(key, params, config), which"
        " returns (residual params, adapters), and run, merge and save the adapters with the"
        " residual params.")
  return _init_tree(key, params, config, layouts)[1]


def init_adapters_and_base(
    key: Array,
    params: Params,
    config: Any,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[Params, dict]:
  """Adapters and the base params they run on, for any init (PEFT semantics).

  PiSSA and OLoRA (``LoraConfig.init_lora_weights`` ``"pissa"``, ``"pissa_niter_N"``,
  ``"olora"``; :mod:`dora_jax.variants.lora`) take ``s·A0 B0`` from each targeted kernel:
  the residual ``W_res = W0 − s·A0 B0`` replaces it, so the adapted model starts equal
  to the base (PEFT's ``pissa_init`` / ``olora_init`` write ``W_res`` into the base layer).
  Train, run and merge (:func:`merge`) the adapters with the returned params. To export a
  LoRA for the original ``W0`` (PEFT's ``path_initial_model_for_weight_conversion``), keep
  the returned adapters: :func:`dora_jax.export_peft` ``(..., initial_adapters=...)``.
  For the other inits the params come back unchanged (a plain :func:`init_adapters`).

  Args, Raises: as :func:`init_adapters`; also a quantized or integer targeted kernel
    (initialize the float model, then quantize the residual params, as PEFT advises).

  Returns:
    ``(params, adapters)``: ``params`` with each targeted kernel replaced by ``W_res`` (same
    shape, dtype and boxes), and the adapters (DoRA: ``magnitude = ||W_res + s·A0 B0||_c``).
  """
  return _init_tree(key, params, config, layouts)


def _init_tree(key: Array, params: Params, config: Any,
               layouts: Mapping[str, KernelLayout] | None) -> tuple[Params, dict]:
  """``(params, adapters)``: :func:`init_adapters_and_base`'s work, for any init."""
  boxed = params
  params = unbox(params)
  layouts = dict(layouts or {})
  variant = variants.config_variant(config)
  new_init = getattr(config, "init_lora_weights", True) in ("orthogonal",) or getattr(
      config, "modifies_base", False)
  mats = {}
  for path in select_targets(params, config, layouts=layouts):
    module = get_path(params, path)
    w = module[weight_key(module)]
    kind = module_kind(path, module, layouts)
    if new_init and kind != "linear":
      raise ValueError(
          f"init_lora_weights={config.init_lora_weights!r} is for Linear-type modules only, but"
          f" '{path}' is a {kind} layer (PEFT's Conv refuses this init, its Embedding silently"
          " uses the default one). Exclude it (exclude_modules) or use init_lora_weights=True.")
    layout = layouts.get(path) or default_layout(path, tuple(w.shape))
    *_, i_dim, o_dim = layout.matrix_shape(tuple(w.shape))
    mc = variants.module_config(config, path)
    max_r = getattr(mc, "max_rank", lambda i, o: min(i, o))(i_dim, o_dim)
    if mc.r > max_r:
      raise ValueError(
          f"r={mc.r} is larger than the module '{path}' allows: its kernel is"
          f" {i_dim} x {o_dim} (inputs x outputs), so the rank can be at most"
          f" {max_r}. Lower r or exclude this module."
      )
    mats[path] = (module, layout)
  shared = {}
  if variant.init_shared is not None:
    dims = [layout.matrix_shape(tuple(m[weight_key(m)].shape))[-2:] for m, layout in mats.values()]
    shared = variant.init_shared(max(i for i, _ in dims), max(o for _, o in dims), config)
  flat = {}
  for path, (module, layout) in mats.items():
    if getattr(config, "modifies_base", False):
      from dora_jax import quant  # pylint: disable=g-import-not-at-top  (quant builds on tree)

      if quant.is_quantized(module[weight_key(module)]):
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} rewrites the kernel at '{path}',"
            " which is quantized: initialize on the float params, then quantize the residual"
            " params (dora_jax.quantize), as PEFT advises for PiSSA.")
    w_mat, shape = _kernel_matrix(module, layout, path)
    stack_shape = w_mat.shape[:-2]
    keys = _path_key(key, path)
    if stack_shape:  # one key per stacked layer
      keys = jax.random.split(keys, math.prod(stack_shape)).reshape(stack_shape)
    mc = variants.module_config(config, path)
    if getattr(mc, "modifies_base", False):
      init = lambda k, w_: variants.init_adapter_and_base(k, w_, mc)
      flat[path], w_res = _stacked(init, layout.stack)(keys, w_mat)
      boxed = _replace_weight(boxed, path, jnp.reshape(w_res, shape))
    else:
      init = lambda k, w_: variants.init_adapter(k, w_, mc, shared)
      flat[path] = _stacked(init, layout.stack)(keys, w_mat)
  out = unflatten(flat)
  if shared:
    out[SHARED_KEY] = shared
  return boxed, out
