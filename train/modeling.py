"""Loading the base model and tokenizer a run starts from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dora_jax.models.llama import Llama, LlamaConfig

TINY_CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                          tie_word_embeddings=True, max_position_embeddings=512, bos_token_id=1,
                          eos_token_id=2)

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclasses.dataclass
class BaseModel:
  config: LlamaConfig
  params: Any
  tokenizer: Any


def tiny_tokenizer(vocab_size: int = TINY_CONFIG.vocab_size):
  """A small byte-level BPE trained on a fixed English text, with a chat template (for tests)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  corpus = [
      "the movie was a delight, funny and warm and wise.", "a dull, tedious mess with no heart.",
      "Review: positive negative Sentiment: the film is good bad great awful boring moving",
      "business politics sport tech entertainment news article about the market and the election",
  ] * 4
  tok.train_from_iterator(corpus, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                 pad_token="<pad>", unk_token=None)
  fast.chat_template = TINY_CHAT_TEMPLATE
  return fast


def load_base_model(cfg, shardings_for=None) -> BaseModel:
  """``cfg.model``: 'smollm2-135m', 'tiny-random', or a Hugging Face checkpoint directory.

  ``shardings_for(config) -> tree of Sharding``: where each parameter goes. A checkpoint
  directory is read straight into the shards (each process reads only its slices); the other
  sources are placed after loading.
  """
  from dora_jax import sharding as sh

  place = (lambda config, params: params) if shardings_for is None else (
      lambda config, params: sh.shard_params(params, shardings_for(config)))
  dtype = jnp.dtype(cfg.dtype)
  if cfg.model == "tiny-random":
    tokenizer = tiny_tokenizer()
    config = dataclasses.replace(TINY_CONFIG, vocab_size=len(tokenizer))
    model = Llama(config, scan_layers=cfg.scan_layers)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1234), jnp.zeros((1, 8), jnp.int32))["params"])
    return BaseModel(config, place(config, params), tokenizer)
  if cfg.model in ("smollm2-135m", "smollm2"):
    from dora_jax.models.smollm2 import load_smollm2
    config, params, tokenizer = load_smollm2(dtype=cfg.dtype, scan_layers=cfg.scan_layers)
    return BaseModel(config, place(config, params), tokenizer)
  path = Path(cfg.model)
  if not path.is_dir():
    raise FileNotFoundError(
        f"--model {cfg.model!r} is neither 'smollm2-135m', 'tiny-random' nor a checkpoint directory.")
  from transformers import AutoTokenizer

  from dora_jax.models.hf import load_config, load_pretrained
  sharding_fn = None
  if shardings_for is not None:
    sharding_fn = sh.path_sharding_fn(shardings_for(load_config(path)))
  config, params = load_pretrained(path, dtype=dtype.name, scan_layers=cfg.scan_layers,
                                   sharding_fn=sharding_fn)
  tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  return BaseModel(config, params, tokenizer)
