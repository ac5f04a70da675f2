"""Hugging Face checkpoints (safetensors + ``config.json``) ⇄ :class:`~dora_jax.models.llama.Llama` params.

Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (text) checkpoints; Gemma's norm
weights are kept as stored (the model computes ``1 + w``).

The mapping is pure name/layout bookkeeping::

    model.embed_tokens.weight                  [V, D]      -> model/embed_tokens/embedding  [V, D]
    model.layers.{i}.self_attn.q_proj.weight   [H*hd, D]   -> model/layers_{i}/self_attn/q_proj/kernel [D, H*hd]
    model.layers.{i}.self_attn.q_proj.bias     [H*hd]      -> .../q_proj/bias  (qwen2 / attention_bias)
    model.layers.{i}.input_layernorm.weight    [D]         -> model/layers_{i}/input_layernorm/scale
    model.layers.{i}.self_attn.q_norm.weight   [hd]        -> .../self_attn/q_norm/scale  (qwen3, gemma3_text)
    model.layers.{i}.pre_feedforward_layernorm.weight [D]  -> .../pre_feedforward_layernorm/scale  (gemma)
    model.norm.weight                          [D]         -> model/norm/scale
    lm_head.weight                             [V, D]      -> lm_head/kernel [D, V]  (absent when tied)

Linear weights are transposed (HF ``[out, in]`` → Flax ``[in, out]``). With
``scan_layers=True`` the per-layer leaves are stacked under ``model/layers`` with a
leading ``[L]`` axis.

Reading never imports torch: safetensors' numpy framework (bfloat16 via
``ml_dtypes``), with a raw memory-mapped reader as a fallback for safetensors
versions whose numpy backend rejects bfloat16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from dora_jax.models.llama import SUPPORTED_MODEL_TYPES, LlamaConfig

Params = dict[str, Any]
ShardingFn = Callable[[tuple[str, ...], tuple[int, ...], np.dtype], "jax.sharding.Sharding | None"]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# HF tensors that carry no parameters of ours and are skipped on load (old
# checkpoints saved RoPE's inverse frequencies as buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- the mapping


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One leaf of the params tree and the HF tensor(s) it is made of.

  Attributes:
    path: the leaf's path in the params tree, e.g. ``("model", "layers", "mlp", "up_proj", "kernel")``.
    hf_names: the HF tensor names, one per stacked layer (``len == L``) when ``stacked``, else one.
    hf_shape: the shape of each HF tensor.
    transpose: whether the leaf is the HF tensor transposed (2-D linear weights).
    stacked: whether the leaf stacks ``hf_names`` on a new leading axis (scanned layers).
  """

  path: tuple[str, ...]
  hf_names: tuple[str, ...]
  hf_shape: tuple[int, ...]
  transpose: bool
  stacked: bool

  @property
  def shape(self) -> tuple[int, ...]:
    """The leaf's shape: ``hf_shape`` (reversed when transposed), ``[L]`` prepended when stacked."""
    base = tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape
    return ((len(self.hf_names),) + base) if self.stacked else base


def _layer_entries(config: LlamaConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
  """``(hf suffix, path inside one layer, HF shape, transpose)`` for every tensor of one layer."""
  c = config
  d, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  out = []
  for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
    out.append((f"self_attn.{name}.weight", ("self_attn", name, "kernel"), (rows, d), True))
    if c.attention_bias:
      out.append((f"self_attn.{name}.bias", ("self_attn", name, "bias"), (rows,), False))
  out += [
      ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (d, q), True),
      ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f, d), True),
      ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f, d), True),
      ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d, f), True),
  ]
  if c.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head
    out += [(f"self_attn.{n}.weight", ("self_attn", n, "scale"), (c.head_dim,), False)
            for n in ("q_norm", "k_norm")]
  norms = ["input_layernorm", "post_attention_layernorm"]
  if c.is_gemma:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  out += [(f"{n}.weight", (n, "scale"), (d,), False) for n in norms]
  return out


def param_specs(config: LlamaConfig, scan_layers: bool) -> list[ParamSpec]:
  """Every leaf of the params tree of ``Llama(config, scan_layers=...)`` with its HF source."""
  c = config
  specs = [ParamSpec(("model", "embed_tokens", "embedding"), ("model.embed_tokens.weight",),
                     (c.vocab_size, c.hidden_size), False, False)]
  for suffix, sub, shape, transpose in _layer_entries(c):
    names = tuple(f"model.layers.{i}.{suffix}" for i in range(c.num_hidden_layers))
    if scan_layers:
      specs.append(ParamSpec(("model", "layers") + sub, names, shape, transpose, True))
    else:
      specs += [ParamSpec(("model", f"layers_{i}") + sub, (n,), shape, transpose, False)
                for i, n in enumerate(names)]
  specs.append(ParamSpec(("model", "norm", "scale"), ("model.norm.weight",), (c.hidden_size,), False, False))
  if not c.tie_word_embeddings:
    specs.append(ParamSpec(("lm_head", "kernel"), ("lm_head.weight",), (c.vocab_size, c.hidden_size),
                           True, False))
  return specs


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name → shape, for every tensor a checkpoint of ``config`` holds."""
  return {n: s.hf_shape for s in param_specs(config, scan_layers=False) for n in s.hf_names}


def _is_ignorable(name: str, config: LlamaConfig) -> bool:
  """Tensors a checkpoint may hold that we do not need (tied head copies, RoPE buffers)."""
  return name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")


def check_hf_tensors(shapes: Mapping[str, Sequence[int]], config: LlamaConfig, source: str = "checkpoint") -> None:
  """Raise ``ValueError`` unless ``shapes`` (HF name → shape) is exactly what ``config`` needs.

  The message lists up to 5 missing and 5 unexpected names, or the first shape mismatches
  (name, expected, got).
  """
  expected = hf_shapes(config)
  missing = [n for n in expected if n not in shapes]
  unexpected = [n for n in shapes if n not in expected and not _is_ignorable(n, config)]
  if missing or unexpected:
    raise ValueError(
        f"The {source} does not match the {config.model_type} config "
        f"({config.num_hidden_layers} layers, attention_bias={config.attention_bias}, "
        f"tie_word_embeddings={config.tie_word_embeddings}): "
        f"{len(missing)} missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
        f"{len(unexpected)} unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}.")
  bad = [(n, s, tuple(shapes[n])) for n, s in expected.items() if tuple(shapes[n]) != s]
  if bad:
    lines = "; ".join(f"{n}: expected {e}, got {g}" for n, e, g in bad[:5])
    raise ValueError(f"Shape mismatch in the {source} ({len(bad)} tensors): {lines}"
                     f"{' ...' if len(bad) > 5 else ''}.")


# A reader returns the HF tensor ``name``, or ``name[index]`` (index in HF layout) when given.
Reader = Callable[[str, "tuple[slice, ...] | None"], np.ndarray]


def _read_leaf(spec: ParamSpec, read: Reader, index: tuple[slice, ...] | None = None) -> np.ndarray:
  """The leaf ``spec`` (or ``leaf[index]``, ``index`` in our layout) assembled from HF tensors."""
  def one(name: str, idx: tuple[slice, ...] | None) -> np.ndarray:
    if spec.transpose:
      hf_idx = None if idx is None else tuple(reversed(idx))
      return read(name, hf_idx).T
    return read(name, idx)

  if not spec.stacked:
    return one(spec.hf_names[0], index)
  if index is None:
    return np.stack([one(n, None) for n in spec.hf_names])
  layers = range(len(spec.hf_names))[index[0]]
  rest = tuple(index[1:])
  return np.stack([one(spec.hf_names[i], rest) for i in layers])


def hf_to_params(tensors: Mapping[str, np.ndarray], config: LlamaConfig, scan_layers: bool = False) -> Params:
  """HF-named tensors → the params tree of ``Llama(config, scan_layers=scan_layers)``.

  Args:
    tensors: HF name → array in HF layout (e.g. ``model.layers.0.mlp.up_proj.weight [F, D]``).
    config: the architecture.
    scan_layers: stack the layers under ``model/layers`` with a leading ``[L]`` axis.

  Returns:
    A nested dict of numpy arrays (dtypes kept), linear weights transposed to ``[in, out]``.

  Raises:
    ValueError: missing / unexpected tensors or a shape mismatch.
  """
  check_hf_tensors({k: np.shape(v) for k, v in tensors.items()}, config, "tensors")
  read: Reader = lambda name, idx: np.asarray(tensors[name])
  specs = param_specs(config, scan_layers)
  return traverse_util.unflatten_dict({spec.path: _read_leaf(spec, read) for spec in specs})


def _to_numpy(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError(
        "params_to_hf needs fully addressable arrays; gather multi-host params first "
        "(jax.experimental.multihost_utils.process_allgather).")
  return np.asarray(x)


def _unbox(params: Mapping) -> Mapping:
  """Strip Flax metadata boxes (``nn.LogicallyPartitioned``) from a freshly initialized tree."""
  from flax.core import meta
  return meta.unbox(params)


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
  """The params tree of ``Llama(config)`` (scanned or not) → HF name → numpy array in HF layout.

  Raises:
    ValueError: the tree's leaves do not match ``config`` (lists missing / unexpected paths).
  """
  params = _unbox(params)
  if "params" in params and "model" not in params:
    params = params["params"]
  scan_layers = "layers" in params.get("model", {})
  specs = param_specs(config, scan_layers)
  want = {s.path for s in specs}
  flat = traverse_util.flatten_dict(params)
  have = set(flat)
  if want != have:
    missing = sorted("/".join(p) for p in want - have)
    unexpected = sorted("/".join(p) for p in have - want)
    raise ValueError(
        f"The params do not match the config (scan_layers={scan_layers}): "
        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}.")
  out: dict[str, np.ndarray] = {}
  for spec in specs:
    leaf = _to_numpy(flat[spec.path])
    if leaf.shape != spec.shape:
      raise ValueError(f"params/{'/'.join(spec.path)}: expected shape {spec.shape}, got {leaf.shape}.")
    parts = list(leaf) if spec.stacked else [leaf]
    for name, part in zip(spec.hf_names, parts):
      out[name] = np.ascontiguousarray(part.T if spec.transpose else part)
  return out


# ----------------------------------------------------------------------------- safetensors files

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
  """``(header dict, byte offset of the data)`` of a safetensors file, read without safetensors."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  return header, 8 + n


def read_safetensors_raw(path: str | os.PathLike, name: str) -> np.ndarray:
  """Tensor ``name`` of a safetensors file as a read-only memory map (any dtype, bf16 included)."""
  header, base = read_safetensors_header(path)
  entry = header[name]
  dtype = _ST_DTYPES[entry["dtype"]]
  start, end = entry["data_offsets"]
  shape = tuple(entry["shape"])
  if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
    raise ValueError(f"{path}: tensor {name!r} has {end - start} bytes, expected {shape} x {dtype}.")
  if not shape or 0 in shape:
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)


class _SafetensorsReader:
  """Lazy access to the tensors of one or more safetensors files (no torch).

  Uses ``safetensors.safe_open(framework="numpy")``; a tensor whose dtype that backend
  rejects (bfloat16 in old safetensors versions) is read through a raw memory map.
  """

  def __init__(self, files: Mapping[str, Path], stack: contextlib.ExitStack):
    from safetensors import safe_open
    self._file_of = dict(files)  # tensor name -> file
    self._handles = {p: stack.enter_context(safe_open(str(p), framework="numpy"))
                     for p in sorted(set(self._file_of.values()))}
    self._headers = {p: read_safetensors_header(p)[0] for p in self._handles}

  def names(self) -> list[str]:
    return list(self._file_of)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {n: tuple(self._headers[p][n]["shape"]) for n, p in self._file_of.items()}

  def dtype(self, name: str) -> np.dtype:
    """The stored dtype of ``name`` (from the file header)."""
    code = self._headers[self._file_of[name]][name]["dtype"]
    if code not in _ST_DTYPES:
      raise ValueError(f"{self._file_of[name]}: tensor {name!r} has unsupported dtype {code}.")
    return _ST_DTYPES[code]

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """``tensor`` or ``tensor[index]``; only the requested slice is read from disk."""
    path = self._file_of[name]
    try:
      if index is None:
        return self._handles[path].get_tensor(name)
      return self._handles[path].get_slice(name)[tuple(index)]
    except (TypeError, ValueError, KeyError) as e:  # e.g. "bf16 not supported by numpy"
      if self._headers[path][name]["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype "
                         f"{self._headers[path][name]['dtype']}.") from e
      arr = read_safetensors_raw(path, name)
      return np.array(arr if index is None else arr[tuple(index)])


def _list_dir(path: Path) -> str:
  files = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
  return ", ".join(files) if files else "(empty)"


def safetensors_files(path: str | os.PathLike) -> dict[str, Path]:
  """Tensor name → file, from ``model.safetensors`` or ``model.safetensors.index.json`` in ``path``.

  Raises:
    FileNotFoundError: neither file exists (the message lists the directory), or a shard is missing.
  """
  path = Path(path)
  index = path / SAFETENSORS_INDEX
  single = path / SAFETENSORS_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: path / fname for name, fname in weight_map.items()}
    absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
    if absent:
      raise FileNotFoundError(f"{index} names shards that do not exist: {absent}. "
                              f"Files in {path}: {_list_dir(path)}")
    return files
  if single.is_file():
    from safetensors import safe_open
    with safe_open(str(single), framework="numpy") as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(
      f"No {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path} (only safetensors checkpoints "
      f"are supported). Files there: {_list_dir(path)}")


def load_config(path: str | os.PathLike) -> LlamaConfig:
  """``config.json`` of an HF checkpoint directory → :class:`LlamaConfig` (read offline).

  Raises:
    FileNotFoundError: no ``config.json`` (the message lists the directory).
    ValueError: a ``model_type`` not in :data:`~dora_jax.models.llama.SUPPORTED_MODEL_TYPES`.
  """
  path = Path(path)
  cfg_file = path / CONFIG_FILE
  if not path.is_dir():
    raise FileNotFoundError(f"Checkpoint directory {path} does not exist.")
  if not cfg_file.is_file():
    raise FileNotFoundError(f"No {CONFIG_FILE} in {path}. Files there: {_list_dir(path)}")
  model_type = json.loads(cfg_file.read_text()).get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    hint = (" (a multimodal Gemma 3: only text-only Gemma3ForCausalLM checkpoints, model_type"
            " 'gemma3_text', are supported)") if model_type == "gemma3" else ""
    raise ValueError(f"Unsupported model_type {model_type!r} in {cfg_file}{hint}; "
                     f"supported: {list(SUPPORTED_MODEL_TYPES)}.")
  from transformers import AutoConfig
  return LlamaConfig.from_hf(AutoConfig.from_pretrained(str(path), local_files_only=True))


def _resolve_dtype(dtype: Any) -> np.dtype | None:
  return None if dtype is None else np.dtype(jnp.dtype(dtype))


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = "float32",
    param_dtype: Any = None,
    scan_layers: bool = False,
    sharding_fn: ShardingFn | None = None,
) -> tuple[LlamaConfig, Params]:
  """Load an HF Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 checkpoint directory, offline, no torch.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
      ``model.safetensors.index.json``).
    dtype: dtype of the returned params (``None``: as stored).
    param_dtype: overrides ``dtype`` for the params when given (mirrors the Flax module's
      ``param_dtype``; the module's compute ``dtype`` is the caller's choice).
    scan_layers: return the stacked layout (``model/layers`` with a leading ``[L]`` axis).
    sharding_fn: ``(path_tuple, shape, dtype) -> Sharding | None``. When it returns a sharding,
      the leaf is built with ``jax.make_array_from_callback``, so this process reads from disk
      only the slices its addressable devices hold; ``None`` puts the leaf on the default device.

  Returns:
    ``(config, params)``: params a nested dict of ``jax.Array`` as ``Llama(config).init`` makes.

  Raises:
    FileNotFoundError: no ``config.json`` or no safetensors (lists the files present).
    ValueError: unsupported ``model_type``; missing / unexpected tensors; shape mismatch.
  """
  config = load_config(path)
  target = _resolve_dtype(param_dtype if param_dtype is not None else dtype)
  files = safetensors_files(path)
  flat: dict[tuple[str, ...], jax.Array] = {}
  with contextlib.ExitStack() as stack:
    reader = _SafetensorsReader(files, stack)
    check_hf_tensors(reader.shapes(), config, f"checkpoint at {path}")
    for spec in param_specs(config, scan_layers):
      out_dtype = target if target is not None else reader.dtype(spec.hf_names[0])
      sharding = sharding_fn(spec.path, spec.shape, out_dtype) if sharding_fn is not None else None
      if sharding is None:
        leaf = jax.device_put(_read_leaf(spec, reader.read).astype(out_dtype, copy=False))
      else:
        leaf = jax.make_array_from_callback(
            spec.shape, sharding,
            lambda idx, spec=spec, dt=out_dtype: _read_leaf(spec, reader.read, _full_index(idx, spec.shape))
            .astype(dt, copy=False))
      flat[spec.path] = leaf
  return config, traverse_util.unflatten_dict(flat)


def _full_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  """Normalize a ``make_array_from_callback`` index to one explicit ``slice`` per axis."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


# ----------------------------------------------------------------------------- saving


def _hf_dtype_name(dtype: np.dtype) -> str:
  return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


def _shard(tensors: Mapping[str, np.ndarray], max_shard_size: int | None) -> list[dict[str, np.ndarray]]:
  """Split ``tensors`` (in order) into groups of at most ``max_shard_size`` bytes (≥ 1 tensor each)."""
  if max_shard_size is None:
    return [dict(tensors)]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_size:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  return shards


def write_safetensors_raw(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                          metadata: Mapping[str, str] | None = None) -> None:
  """Write a safetensors file without safetensors (little-endian data, 8-byte aligned header)."""
  codes = {v: k for k, v in _ST_DTYPES.items()}
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  arrays = {}
  for name, t in tensors.items():
    t = np.ascontiguousarray(t)
    if t.dtype.byteorder == ">":
      t = t.astype(t.dtype.newbyteorder("<"))
    code = codes.get(t.dtype.newbyteorder("="))
    if code is None:
      raise ValueError(f"Tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors.")
    header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    arrays[name] = t
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in arrays.values():
      f.write(t.tobytes())


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  """Write one safetensors file with safetensors' numpy backend (no torch), or the raw writer
  when that backend rejects a dtype (bfloat16 in old safetensors versions)."""
  from safetensors.numpy import save_file
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=dict(metadata))
  except (TypeError, ValueError, KeyError):
    write_safetensors_raw(path, tensors, metadata)
  os.chmod(path, 0o644)  # safetensors creates the file 0600; a shared cache needs it readable


@contextlib.contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
  """A fresh path beside ``dest`` to build a directory in; moved onto ``dest`` when the block succeeds.

  The yielded path does not exist yet. When the ``with`` block ends without an exception,
  it replaces ``dest`` (the old directory is renamed aside first, then removed), so a
  reader never sees a half-written ``dest``; on an exception ``dest`` is left as it was.
  Whatever is left of the temporary directory is removed in both cases.
  """
  tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    yield tmp
    if dest.exists():
      trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
      os.replace(dest, trash)
      os.replace(tmp, dest)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(
    path: str | os.PathLike,
    config: LlamaConfig,
    params: Mapping[str, Any],
    tokenizer: Any = None,
    dtype: Any = None,
    max_shard_size: int | None = None,
) -> Path:
  """Write an HF checkpoint directory that :func:`load_pretrained` and transformers read.

  Writes ``config.json`` (``architectures``, ``model_type``, ``dtype``/``torch_dtype``),
  ``model.safetensors`` (HF names and ``[out, in]`` layouts, metadata ``{"format": "pt"}``) —
  or ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json`` when
  ``max_shard_size`` (bytes) is exceeded — and the tokenizer's files when ``tokenizer`` is given.
  The directory is assembled next to ``path`` and moved into place, replacing ``path``.

  Args:
    path: the output directory.
    config: the architecture.
    params: the params tree (scanned or not; fully addressable arrays).
    tokenizer: anything with ``save_pretrained(dir)`` (a transformers tokenizer), or ``None``.
    dtype: cast the tensors to this dtype (``None``: keep each leaf's dtype).
    max_shard_size: shard the weights into files of at most this many bytes.

  Returns:
    ``Path(path)``.
  """
  dest = Path(path)
  dest.parent.mkdir(parents=True, exist_ok=True)
  tensors = params_to_hf(params, config)
  target = _resolve_dtype(dtype)
  if target is not None:
    tensors = {k: v.astype(target) for k, v in tensors.items()}
  stored = np.dtype(tensors["model.embed_tokens.weight"].dtype)
  hf_config = config.to_hf_dict()
  hf_config["dtype"] = hf_config["torch_dtype"] = _hf_dtype_name(stored)

  with atomic_directory(dest) as tmp:
    tmp.mkdir()
    (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards = _shard(tensors, max_shard_size)
    metadata = {"format": "pt"}
    if len(shards) == 1:
      _write_safetensors(tmp / SAFETENSORS_FILE, shards[0], metadata)
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(tmp / fname, shard, metadata)
        weight_map.update({name: fname for name in shard})
      index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
               "weight_map": weight_map}
      (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return dest
