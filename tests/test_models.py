"""Our Llama and SmolLM2 conversion against transformers' own (torch) implementations.

Complements tests/test_llama.py (a numpy decoder) and tests/test_hf_io.py (checkpoint I/O):
here the references are transformers' Llama / Mistral models with RoPE scaling, and
transformers' GGUF loader for the bundled SmolLM2 (marked slow: run with ``-m slow``).
Skipped where torch is not installed (the library itself never imports torch).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dora_jax.models import hf, smollm2
from dora_jax.models.llama import Llama, LlamaConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
            rope_theta=500.0, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
LINEAR = {"rope_type": "linear", "factor": 2.0}
# T = 20 > original_max_position_embeddings: every llama3 frequency band is exercised.
IDS = (np.arange(40).reshape(2, 20) * 7) % TINY["vocab_size"]
MASK = np.ones((2, 20), np.int64)
MASK[1, 13:] = 0  # right padding in the second row


def _torch_model(model_type: str, rope_scaling, seed: int = 0):
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[model_type]
  kw = dict(TINY)
  if rope_scaling is not None:
    kw["rope_scaling"] = dict(rope_scaling)
  if model_type == "mistral":
    kw["sliding_window"] = None
  torch.manual_seed(seed)
  model = cls[1](cls[0](**kw)).eval()
  with torch.no_grad():  # norms away from 1, so a mixed-up norm weight shows
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model


def _ours(config: LlamaConfig, params, scan: bool = False) -> np.ndarray:
  out = Llama(config, scan_layers=scan).apply({"params": params}, jnp.asarray(IDS, jnp.int32),
                                              attention_mask=jnp.asarray(MASK))
  return np.asarray(out)


def _assert_close_where_valid(ours: np.ndarray, theirs: np.ndarray, atol: float) -> None:
  valid = MASK.astype(bool)
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=atol, rtol=atol)


@pytest.mark.parametrize("model_type,rope_scaling", [("llama", LLAMA3), ("llama", LINEAR), ("mistral", None)])
def test_transformers_checkpoint_logits(tmp_path, model_type, rope_scaling):
  """A checkpoint transformers wrote (RoPE scaling in transformers 5's ``rope_parameters``)."""
  model = _torch_model(model_type, rope_scaling)
  model.save_pretrained(str(tmp_path))
  with torch.no_grad():
    theirs = model(torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()
  config, params = hf.load_pretrained(tmp_path, scan_layers=True)
  assert config.model_type == model_type and config.rope_theta == TINY["rope_theta"]
  assert config.rope_scaling == rope_scaling  # rope_theta is not folded into the scaling dict
  _assert_close_where_valid(_ours(config, params, scan=True), theirs, atol=2e-5)


def test_rope_scaling_config_round_trip(tmp_path):
  """Our ``save_pretrained`` → transformers and → ``load_pretrained`` keep a llama3-scaled config."""
  config = LlamaConfig(**TINY, rope_scaling=LLAMA3)
  params = Llama(config).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]
  hf.save_pretrained(tmp_path, config, params)
  loaded, loaded_params = hf.load_pretrained(tmp_path)
  assert loaded == config
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
  assert model.config.rope_parameters["rope_type"] == "llama3"
  with torch.no_grad():
    theirs = model(torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()
  _assert_close_where_valid(_ours(loaded, loaded_params), theirs, atol=2e-5)


# ---------------------------------------------------------------------------
# SmolLM2: our GGUF conversion (no torch) against transformers' GGUF loader (torch)

TEXTS = [
    "The capital of France is",
    "Prices rose 3.25% in 2024, the agency said; émigré cafés — “quoted” — stayed open.\n\n  x\ty",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def gguf_reference():
  try:
    gguf_path = smollm2.find_smollm2_gguf()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  folder, name = str(gguf_path.parent), gguf_path.name
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  return tokenizer, model.eval()


@pytest.mark.slow  # transformers' GGUF loader dequantizes the whole file again (~30 s CPU)
def test_smollm2_tokenizer_matches_transformers_gguf(gguf_reference):
  ref, _ = gguf_reference
  ours = transformers.AutoTokenizer.from_pretrained(str(smollm2.smollm2_path()), local_files_only=True)
  for text in TEXTS:
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
  messages = [{"role": "user", "content": "Name a colour."}]
  assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
          == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(gguf_reference):
  """Same dequantized weights, q/k un-permuted the same way, same config: logits agree."""
  ref_tok, ref_model = gguf_reference
  config, params, tokenizer = smollm2.load_smollm2()
  ids = np.asarray(tokenizer(TEXTS[1])["input_ids"], np.int32)[None]
  with torch.no_grad():
    theirs = ref_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids)))
  scale = np.abs(theirs).max()
  err = np.abs(ours - theirs).max()
  print(f"SmolLM2 vs transformers GGUF: max |Δlogit| = {err:.2e} (max |logit| {scale:.1f})")
  assert err < 1e-3 * scale, err
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


# ---------------------------------------------------------------------------
# Gemma 2, Gemma 3 (text) and Qwen3: transformers writes a random checkpoint, we load it

FAMILY = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
              max_position_embeddings=64)


def _family_model(model_type: str, seed: int = 0):
  """Small configs where every family trait matters at T = 20: a window of 4 on some layers,
  caps small enough for tanh to bend, a score scale other than head_dim^-1/2, two RoPE bases."""
  if model_type == "gemma2":
    cfg = transformers.Gemma2Config(**FAMILY, rope_theta=500.0, query_pre_attn_scalar=6, sliding_window=4,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
  elif model_type == "gemma3_text":
    cfg = transformers.Gemma3TextConfig(
        **FAMILY, query_pre_attn_scalar=6, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 77.0}})
  else:
    cfg = transformers.Qwen3Config(**FAMILY, rope_theta=500.0)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # norms away from their init, so a mixed-up or un-offset norm shows
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model


def _hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()


@pytest.mark.parametrize("model_type,scan", [("gemma2", False), ("gemma3_text", True), ("qwen3", False)])
def test_family_logits_match_transformers(tmp_path, model_type, scan):
  model = _family_model(model_type)
  model.save_pretrained(str(tmp_path / "theirs"))
  theirs = _hf_logits(model)
  config, params = hf.load_pretrained(tmp_path / "theirs", scan_layers=scan)
  assert config.model_type == model_type and config.qk_norm == (model_type != "gemma2")
  assert config.sliding_window == (None if model_type == "qwen3" else 4)
  if model_type == "gemma3_text":
    assert (config.rope_theta, config.rope_local_base_freq, config.rope_scaling["factor"]) == (500.0, 77.0, 2.0)
  _assert_close_where_valid(_ours(config, params, scan=scan), theirs, atol=1e-4)
  # Our writer: transformers reads the same model back, and so do we.
  hf.save_pretrained(tmp_path / "ours", config, params)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), local_files_only=True)
  _assert_close_where_valid(_hf_logits(again.eval()), theirs, atol=1e-5)
  assert hf.load_config(tmp_path / "ours") == config


def test_family_peft_export_loads_on_transformers(tmp_path):
  """DoRA adapters on a Gemma 3 with PEFT's module names: PEFT on the transformers model computes
  what wrap() computes on ours."""
  peft = pytest.importorskip("peft")
  import dora_jax

  model = _family_model("gemma3_text", seed=1)
  model.save_pretrained(str(tmp_path / "base"))
  config, params = hf.load_pretrained(tmp_path / "base")
  lcfg = dora_jax.LoraConfig(r=2, lora_alpha=4.0, use_dora=True, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"])
  adapters = dora_jax.init_adapters(jax.random.key(3), params, lcfg)
  dora_jax.export_peft(tmp_path / "adapter", adapters, lcfg, params=params)
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
  ours = dora_jax.wrap(Llama(config).apply, lcfg)(params, adapters, jnp.asarray(IDS, jnp.int32),
                                                   attention_mask=jnp.asarray(MASK))
  _assert_close_where_valid(np.asarray(ours), _hf_logits(peft_model), atol=1e-4)
