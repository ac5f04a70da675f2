"""HF PEFT's names: the adapter folder's file names and our module paths as HF module names.

Shared by :mod:`dora_jax.peft_export` and :mod:`dora_jax.peft_import`; all re-exported by
:mod:`dora_jax.peft_format`.
"""

from __future__ import annotations

import re
from typing import Callable

from dora_jax import peft_tensors as pt

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = pt.PEFT_PREFIX

ModuleNameMap = Callable[[str, tuple[int, ...]], str]
"""``(our module path, index into its stacked axes) -> HF module name``."""

_LIST_ITEM = re.compile(r"^(.+)_(\d+)$")


def peft_module_name(path: str, index: tuple[int, ...] = ()) -> str:
  """The HF (torch) module name of one of our modules: the default name map.

  * ``/`` becomes ``.``;
  * a component ``<name>_<i>`` (how Flax names the items of a list attribute,
    e.g. ``layers_3``) becomes ``<name>.<i>`` (a torch ``ModuleList`` item);
  * for a kernel stacked by ``nn.scan`` (``index`` has one entry), the layer index
    goes after the component named ``layers``:
    ``("model/layers/self_attn/q_proj", (3,))`` -> ``model.layers.3.self_attn.q_proj``.

  Models named otherwise pass their own ``module_name_map`` to
  :func:`export_peft` / :func:`import_peft` (it may call this one).

  Raises:
    ValueError: a stacked index that this rule cannot place.
  """
  parts = []
  for part in path.split("/"):
    m = _LIST_ITEM.match(part)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else part)
  if index:
    if len(index) != 1 or "layers" not in parts:
      raise ValueError(
          f"The module '{path}' is stacked with index {index}: the default name map"
          " puts one stacked axis after a 'layers' component. Pass module_name_map="
          "lambda path, index: '<hf name>' for this model."
      )
    at = parts.index("layers")
    parts[at] = f"layers.{index[0]}"
  return ".".join(parts)
