"""One module's adapter tensors in HF PEFT's torch layouts, per layer type and method.

Used by :mod:`dora_jax.peft_format` (:mod:`dora_jax.peft_export`, :mod:`dora_jax.peft_import`). Our adapters are factors of the kernel as a matrix
``W0: [I, O]`` (``lora_a: [I, r]``, ``lora_b: [r, O]``, DoRA ``magnitude: [O]``; VeRA
``vera_lambda_d: [r]``, ``vera_lambda_b: [O]``). PEFT 0.21 stores (checked against
``peft/tuners/lora/layer.py``, ``tuners/lora/dora.py``, ``tuners/vera/model.py`` and what
``get_peft_model_state_dict`` returns for tiny torch models):

=========  ====================================  ==================================  =========================
layer      ``lora_A``                            ``lora_B``                          ``lora_magnitude_vector``
=========  ====================================  ==================================  =========================
Linear     ``lora_A.weight [r, I]``              ``lora_B.weight [O, r]``            ``[O]``
Embedding  ``lora_embedding_A [r, V]``           ``lora_embedding_B [D, r]``         ``[D]``
ConvNd     ``lora_A.weight [r, C_in, *k]``       ``lora_B.weight [C_out, r, 1...]``  ``[1, C_out, 1...]``
=========  ====================================  ==================================  =========================

A Flax ``nn.Conv`` kernel is ``[*k, C_in, C_out]``, flattened to ``I = prod(k)·C_in`` in
``(*k, C_in)`` order, while torch flattens ``[C_out, C_in, *k]`` in ``(C_in, *k)`` order,
so ``lora_a`` is reshaped to ``[*k, C_in, r]`` and its axes permuted to ``[r, C_in, *k]``.
PEFT's DoRA norm of a conv is taken over ``(C_in, *k)`` per output channel
(``_DoraConvNdLayer.get_weight_norm``), the same numbers as our column norm of ``[I, O]``.
A grouped conv (``feature_group_count > 1``) has no PEFT equivalent of our adapter: PEFT
makes ``lora_A`` a full (ungrouped) conv and ``lora_B`` a grouped 1x1 conv, another
parameterization of ``ΔW``; it is refused.

VeRA (``tuners/vera``): per module ``vera_lambda_d [r]`` and ``vera_lambda_b [O]``
unchanged; the shared projections are ``base_model.vera_A [r, I_max]`` (ours ``.T``) and
``base_model.vera_B [O_max, r]`` (ours ``.T``), Linear layers only.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

import numpy as np

PEFT_PREFIX = "base_model.model."
VERA_A_KEY = "base_model.vera_A"
VERA_B_KEY = "base_model.vera_B"

KINDS = ("linear", "embedding", "conv")

PEFT_KEY = re.compile(
    r"^(?P<name>.+)\.(?P<what>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?|vera_lambda_b|vera_lambda_d|base_layer\.weight)$"
)
"""A PEFT key after ``base_model.model.``: the HF module name and the tensor's role."""


def lora_to_peft(kind: str, lora_a: np.ndarray, lora_b: np.ndarray, magnitude: np.ndarray | None,
                 kernel_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """``{key suffix: torch-layout array}`` of one (unstacked) LoRA/DoRA module.

  Args:
    kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
    lora_a, lora_b, magnitude: ``[I, r]``, ``[r, O]``, ``[O]`` or ``None``.
    kernel_shape: the unstacked kernel's shape; for a conv ``[*k, C_in, C_out]``.
  """
  if kind == "embedding":
    out = {"lora_embedding_A": lora_a.T, "lora_embedding_B": lora_b.T}
    if magnitude is not None:
      out["lora_magnitude_vector"] = magnitude
    return out
  if kind == "linear":
    out = {"lora_A.weight": lora_a.T, "lora_B.weight": lora_b.T}
    if magnitude is not None:
      out["lora_magnitude_vector"] = magnitude
    return out
  if kind != "conv":
    raise ValueError(f"Unknown module kind {kind!r}; known: {KINDS}.")
  *k, c_in, c_out = kernel_shape
  n, r = len(k), lora_a.shape[-1]
  a = lora_a.reshape(*k, c_in, r).transpose(n + 1, n, *range(n))  # [r, C_in, *k]
  ones = (1,) * n
  out = {"lora_A.weight": a, "lora_B.weight": lora_b.T.reshape(c_out, r, *ones)}
  if magnitude is not None:
    out["lora_magnitude_vector"] = magnitude.reshape(1, c_out, *ones)
  return out


def lora_from_peft(kind: str, entry: Mapping[str, np.ndarray], kernel_shape: tuple[int, ...],
                   name: str) -> dict[str, np.ndarray]:
  """Inverse of :func:`lora_to_peft`: ``{"lora_a": [I, r], "lora_b": [r, O][, "magnitude": [O]]}``.

  ``entry`` holds the file's tensors by role: ``"A"``, ``"B"``, optionally ``"magnitude"``.

  Raises:
    ValueError: tensors whose layout does not fit the kernel (named by ``name``), or a
      grouped conv's ``lora_B``.
  """
  a, b, m = entry["A"], entry["B"], entry.get("magnitude")
  if kind != "conv":
    if a.ndim != 2 or b.ndim != 2:
      raise ValueError(f"PEFT module '{name}' has lora_A {a.shape} / lora_B {b.shape} but the"
                       f" params' module is a {kind} layer (2-D tensors expected).")
    out = {"lora_a": a.T, "lora_b": b.T}
    if m is not None:
      out["magnitude"] = m.reshape(-1)
    return out
  *k, c_in, c_out = kernel_shape
  n, r = len(k), a.shape[0]
  if b.shape != (c_out, r, *(1,) * n):
    raise ValueError(
        f"PEFT module '{name}' has lora_B {b.shape}, not [{c_out}, {r}, {', '.join('1' * n)}]:"
        " a grouped conv's adapter (PEFT's grouped lora_B) has no dora_jax equivalent.")
  if a.shape != (r, c_in, *k):
    raise ValueError(f"PEFT module '{name}' has lora_A {a.shape}, but the conv kernel"
                     f" {tuple(kernel_shape)} ([*k, C_in, C_out]) needs [r, {c_in}, {', '.join(map(str, k))}].")
  out = {"lora_a": a.transpose(*range(2, n + 2), 1, 0).reshape(-1, r),
         "lora_b": b.reshape(c_out, r).T}
  if m is not None:
    out["magnitude"] = m.reshape(-1)
  return out


def vera_to_peft(kind: str, lambda_d: np.ndarray, lambda_b: np.ndarray, name: str) -> dict[str, np.ndarray]:
  """``{"vera_lambda_d": [r], "vera_lambda_b": [O]}`` of one module (PEFT: Linear only).

  Raises:
    ValueError: for an embedding or conv (PEFT's VeRA adapts Linear layers only).
  """
  if kind != "linear":
    raise ValueError(f"VeRA on the {kind} '{name}' has no PEFT format (PEFT's VeRA adapts"
                     " Linear layers only): export the merged weights instead.")
  return {"vera_lambda_d": lambda_d, "vera_lambda_b": lambda_b}


def vera_projections_to_peft(shared: Mapping[str, np.ndarray], i_max: int | None,
                             o_max: int) -> dict[str, np.ndarray]:
  """``{"base_model.vera_A": [r, I_max], "base_model.vera_B": [O_max, r]}`` from ours
  (``vera_A [>= I_max, r]``, ``vera_B [r, >= O_max]``), sliced to the sizes PEFT allocates
  (``VeraModel._find_dim``: the largest in/out features of the targeted layers).

  ``i_max=None`` keeps all rows of ``vera_A`` (the params were not given).
  """
  a, b = shared["vera_A"], shared["vera_B"]
  i_max = a.shape[0] if i_max is None else i_max
  return {VERA_A_KEY: a[:i_max].T, VERA_B_KEY: b[:, :o_max].T}


_ROLES = {
    "lora_A.weight": "A", "lora_embedding_A": "A", "lora_B.weight": "B", "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
    "vera_lambda_d": "vera_lambda_d", "vera_lambda_b": "vera_lambda_b",
}


def parse_peft_tensors(tensors: Mapping[str, np.ndarray]
                        ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
  """``({hf module name: {role: array, "kind": ...}}, {"vera_A"/"vera_B": file arrays})``.

  Roles: ``"A"``, ``"B"``, ``"magnitude"`` (file layouts) or VeRA's
  ``"vera_lambda_d"``, ``"vera_lambda_b"``; ``kind`` is ``"embedding"``
  (``lora_embedding_*``), ``"conv"`` (a lora_A with more than 2 axes) or ``"linear"``.
  """
  modules: dict[str, dict[str, Any]] = {}
  shared: dict[str, np.ndarray] = {}
  unknown, base_weights = [], []
  for key, value in tensors.items():
    if key in (VERA_A_KEY, VERA_B_KEY):
      shared[key.rsplit(".", 1)[-1]] = value
      continue
    m = PEFT_KEY.match(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else None
    if m is None:
      unknown.append(key)
      continue
    name, what = m.group("name"), m.group("what")
    if what == "base_layer.weight":
      base_weights.append(key)
      continue
    entry = modules.setdefault(name, {})
    role = _ROLES[what]
    entry[role] = value
    if role in ("A", "B"):
      kind = ("embedding" if what.startswith("lora_embedding")
              else "conv" if value.ndim > 2 else "linear")
      if role == "A" or kind == "embedding":
        if entry.setdefault("kind", kind) != kind:
          raise ValueError(f"PEFT module '{name}' mixes Linear, Conv and Embedding LoRA tensors.")
  if unknown:
    raise ValueError(
        f"The PEFT adapter has tensors dora_jax cannot import: {unknown[:10]}"
        f"{' ...' if len(unknown) > 10 else ''} (only LoRA / DoRA on Linear, Conv and"
        " Embedding layers and VeRA on Linear ones, without lora_bias or modules_to_save,"
        " are supported).")
  if base_weights:
    warnings.warn(
        f"The PEFT adapter also stores base weights {base_weights}; they are not"
        " imported (only adapters are).",
        stacklevel=4,
    )
  for name, entry in modules.items():
    lora = "A" in entry or "B" in entry
    vera = "vera_lambda_d" in entry or "vera_lambda_b" in entry
    if lora and ("A" not in entry or "B" not in entry):
      raise ValueError(f"PEFT module '{name}' lacks its lora_A or lora_B tensor.")
    if vera and ("vera_lambda_d" not in entry or "vera_lambda_b" not in entry):
      raise ValueError(f"PEFT module '{name}' lacks its vera_lambda_d or vera_lambda_b tensor.")
    if lora == vera:
      raise ValueError(f"PEFT module '{name}' has neither LoRA nor VeRA tensors, or both: {sorted(entry)}.")
    entry.setdefault("kind", "linear")
  return modules, shared


def drop_tied_heads(modules: dict[str, dict[str, Any]], candidates: Mapping[str, Any]) -> None:
  """Removes from ``modules`` the LoRA of a tied head that the params lack (tied LM head):
  PEFT's ``ensure_weight_tying`` copy of an embedding's adapter
  (``lora_A = lora_embedding_B.T``, ``lora_B = lora_embedding_A.T``); our embedding adapter
  already acts on the head."""
  embeds = [e for e in modules.values() if e.get("kind") == "embedding"]
  for name in [n for n in modules if n not in candidates]:
    e = modules[name]
    if e.get("kind") == "linear" and "A" in e and "magnitude" not in e and any(
        e["A"].shape == m["B"].T.shape and np.array_equal(e["A"], m["B"].T)
        and np.array_equal(e["B"], m["A"].T) for m in embeds):
      del modules[name]
