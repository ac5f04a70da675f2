"""KV-cached generation (dora_jax.models.generation) and its CLI (train.generate).

The reference is the plain forward pass, run again on each row's whole unpadded sequence for
every new token (no cache, no padding, no jit); the cached decoder must pick the same tokens
from the same logits (float32 tolerance), whatever padding surrounds the row.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import dora_jax
from dora_jax.models import generation as gen_lib
from dora_jax.models.generation import generate, left_pad, sample_logits
from dora_jax.models.llama import Llama, LlamaConfig, greedy_generate

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)
GEMMA2 = LlamaConfig(**{**CFG.__dict__, "model_type": "gemma2", "num_hidden_layers": 3, "sliding_window": 3,
                        "layer_types": None, "hidden_act": None, "query_pre_attn_scalar": 6,
                        "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                        "tie_word_embeddings": True})
GEMMA3 = LlamaConfig(**{**CFG.__dict__, "model_type": "gemma3_text", "num_hidden_layers": 3, "sliding_window": 3,
                        "layer_types": ("sliding_attention", "full_attention", "sliding_attention"),
                        "hidden_act": None, "query_pre_attn_scalar": 6, "rope_local_base_freq": 50.0,
                        "tie_word_embeddings": True})
PROMPTS = [[5, 6, 7, 8, 9], [3, 4]]
N = 6


def _params(cfg, scan=False, seed=0):
  """Large random weights (norms too, around their identity) so that logits are spread and a
  wrong cache shows; shapes from ``eval_shape``, values from numpy (no compilation)."""
  model = Llama(cfg, scan_layers=scan)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(seed)
  one = 0.0 if cfg.is_gemma else 1.0

  def leaf(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return jnp.asarray(one + 0.2 * noise if path[-1].key == "scale" else 0.3 * noise)

  return model, jax.tree_util.tree_map_with_path(leaf, nn.unbox(shapes["params"]))


def _reference(forward, prompt, n, width=16):
  """Greedy tokens and the logits they came from: the plain causal forward of the unpadded row
  (zeros after it, which a causal model never sees) recomputed for every token."""
  seq = np.zeros((1, width), np.int32)
  seq[0, :len(prompt)] = prompt
  tokens, logits = [], []
  for i in range(n):
    lg = np.asarray(forward(jnp.asarray(seq)))[0, len(prompt) + i - 1]
    tokens.append(int(lg.argmax()))
    logits.append(lg)
    seq[0, len(prompt) + i] = tokens[-1]
  return np.array(tokens), np.stack(logits)


@pytest.mark.parametrize("cfg,scan", [(CFG, False), (CFG, True), (GEMMA2, False), (GEMMA3, True)],
                         ids=["llama", "llama-scan", "gemma2-window-softcap", "gemma3-window-scan"])
def test_cached_greedy_matches_full_recompute(cfg, scan):
  model, params = _params(cfg, scan)
  ids, mask = left_pad(PROMPTS, pad_token_id=0)
  out = generate(model, params, ids, mask, max_new_tokens=N, return_logits=True)
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  for row, prompt in enumerate(PROMPTS):
    want_tokens, want_logits = _reference(forward, prompt, N)
    np.testing.assert_array_equal(np.asarray(out.tokens[row]), want_tokens)
    np.testing.assert_allclose(np.asarray(out.logits[row]), want_logits, atol=2e-5, rtol=2e-5)
  assert np.asarray(out.lengths).tolist() == [N, N]
  if cfg is CFG and not scan:
    # The uncached path (the benchmark's baseline) gives the same.
    again = generate(model, params, ids, mask, max_new_tokens=N, use_cache=False)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    # The old entry point: prompts + greedy continuations.
    old = greedy_generate(model, params, jnp.asarray([PROMPTS[0], PROMPTS[0][::-1]]), N)
    np.testing.assert_array_equal(np.asarray(old[0]), PROMPTS[0] + np.asarray(out.tokens[0]).tolist())


def test_eos_stops_each_row():
  model, params = _params(CFG)
  ids, mask = left_pad(PROMPTS, pad_token_id=0)
  greedy = np.asarray(generate(model, params, ids, mask, max_new_tokens=N).tokens)
  eos = int(greedy[0, 2])
  out = generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=[eos, 60], pad_token_id=59)
  for row in range(2):
    hits = np.flatnonzero(np.isin(greedy[row], [eos, 60]))
    n = int(hits[0]) + 1 if hits.size else N
    assert int(out.lengths[row]) == n
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :n]), greedy[row, :n])
    assert (np.asarray(out.tokens[row, n:]) == 59).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  model, params = _params(CFG)
  ids, mask = left_pad(PROMPTS, pad_token_id=0)
  greedy = np.asarray(generate(model, params, ids, mask, max_new_tokens=N).tokens)
  draw = lambda seed, **kw: np.asarray(generate(model, params, ids, mask, max_new_tokens=N, seed=seed,
                                                **{"temperature": 1.5, **kw}).tokens)
  a, b, c = draw(0), draw(0), draw(1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a != greedy).any()
  np.testing.assert_array_equal(draw(3, top_k=1), greedy)
  np.testing.assert_array_equal(draw(4, top_p=1e-6), greedy)


def test_sample_logits_keeps_the_top_k_and_nucleus_sets():
  probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0), jnp.float32)
  sample = jax.jit(sample_logits)  # the settings are traced: one compilation
  draws = lambda top_k=0, top_p=1.0: np.asarray(sample(logits, jax.random.key(0), 1.0, top_k, top_p))
  # top-p: the smallest prefix (by probability) whose mass reaches p; top-k: the k largest.
  for p, kept in ((0.5, 2), (0.65, 2), (0.66, 3), (0.9, 4)):
    got = draws(top_p=p)
    assert set(np.unique(got)) == set(range(kept)), (p, np.unique(got))
    freq = np.bincount(got, minlength=6)[:kept] / got.size
    np.testing.assert_allclose(freq, probs[:kept] / probs[:kept].sum(), atol=0.03)
  assert set(np.unique(draws(top_k=3))) == {0, 1, 2}
  assert set(np.unique(draws(top_k=4, top_p=0.5))) == {0, 1}
  np.testing.assert_array_equal(sample_logits(logits[:3], jax.random.key(0)), [0, 0, 0])  # greedy


def test_adapters_unmerged_match_merged_params():
  model, params = _params(CFG, scan=True)
  lcfg = dora_jax.LoraConfig(r=2, lora_alpha=4.0, use_dora=True, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
  adapters = dora_jax.init_adapters(jax.random.key(5), params, lcfg,
                                    layouts=dora_jax.kernel_layouts(model, jnp.zeros((1, 4), jnp.int32)))
  adapters = jax.tree.map(lambda x: 3.0 * x, adapters)  # a change large enough to alter the tokens
  ids, mask = left_pad(PROMPTS, pad_token_id=0)
  kw = dict(max_new_tokens=N, return_logits=True)
  base = generate(model, params, ids, mask, **kw)
  ours = generate(model, params, ids, mask, adapters=adapters, lora_config=lcfg, **kw)
  merged = generate(model, dora_jax.merge(params, adapters, lcfg), ids, mask, **kw)
  assert (np.asarray(ours.tokens) != np.asarray(base.tokens)).any()
  np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(merged.tokens))
  np.testing.assert_allclose(np.asarray(ours.logits), np.asarray(merged.logits), atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
  model, params = _params(CFG)
  with pytest.raises(ValueError, match="left-padded"):
    generate(model, params, np.array([[3, 4, 0]]), np.array([[1, 1, 0]]), max_new_tokens=2)
  with pytest.raises(ValueError, match="together"):
    generate(model, params, np.array([[3, 4]]), max_new_tokens=2, adapters={})
  with pytest.raises(ValueError, match="top_p"):
    generate(model, params, np.array([[3, 4]]), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="no KV cache"):
    model.apply({"params": params}, jnp.array([[3]]), attention_mask=jnp.ones((1, 4)),
                cache_index=jnp.int32(0), mutable=["cache"])
  with pytest.raises(ValueError, match="cache holds 6 slots"):
    model.apply({"params": params, "cache": gen_lib.init_cache(model, 1, 6)}, jnp.array([[3]]),
                attention_mask=jnp.ones((1, 5)), cache_index=jnp.int32(0), mutable=["cache"])


# ---------------------------------------------------------------------------
# The CLI on a run directory made without training: random adapters saved every way the
# trainer saves them (checkpoint, PEFT export, merged export).


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from train.checkpoint import TrainCheckpointer
  from dora_jax.models import hf
  from train.config import TrainConfig
  from train.loop import lora_config, run_fingerprint
  from train.generate import load_base

  run = tmp_path_factory.mktemp("gen") / "run"
  cfg = TrainConfig(model="tiny-random", method="dora", rank=2, alpha=4.0, targets=("q_proj", "v_proj"),
                    output_dir=str(run))
  base = load_base(cfg.model)  # the base the CLI loads (kept for it)
  lcfg = lora_config(cfg)
  adapters = dora_jax.init_adapters(jax.random.key(0), base.params, lcfg)
  adapters = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape), adapters)
  with TrainCheckpointer(run / "checkpoints", run_fingerprint(cfg), async_save=False) as ckpt:
    ckpt.save(3, {"trainable": adapters, "rng": jax.random.key(0)}, force=True)
  dora_jax.export_peft(run / "peft_adapter", adapters, lcfg, params=base.params)
  hf.save_pretrained(run / "merged", base.model.config, dora_jax.merge(base.params, adapters, lcfg),
                     tokenizer=base.tokenizer)
  (run / "metrics.json").write_text(json.dumps({"config": cfg.to_dict()}))
  return run, base, adapters, lcfg


def test_cli_generates_the_same_from_every_source(run_dir, capsys):
  from train import generate as cli

  run, base, adapters, lcfg = run_dir
  prompts = ["the movie was", "a dull mess"]
  # What the library gives with the adapters unmerged, on prompts formatted by the chat template.
  enc = cli.encode_prompts(base.tokenizer, prompts, chat_template=True)
  assert enc[0][-3:] == base.tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
  ids, mask = left_pad(enc, base.tokenizer.pad_token_id, multiple=8)
  want = generate(base.model, base.params, ids, mask, max_new_tokens=5, adapters=adapters,
                  lora_config=lcfg, eos_token_id=base.tokenizer.eos_token_id,
                  pad_token_id=base.tokenizer.pad_token_id,
                  base_norms=dora_jax.linen.base_norms(base.params, adapters))
  want = [base.tokenizer.decode(np.asarray(want.tokens[i, :int(want.lengths[i])]), skip_special_tokens=True)
          for i in range(2)]
  # auto = the latest checkpoint, adapters unmerged through wrap; the exports hold the same
  # adapters (merged in memory by the CLI, or W' itself).
  runs = (("auto", "--no-merge", "checkpoints step 3 (dora)"), ("peft", "--merge", "peft_adapter"),
          ("merged", "--merge", "merged export"))
  for source, merge, origin in runs:
    assert cli.main(["--run", str(run), "--source", source, merge, "--max_new_tokens", "5", "--json", *prompts]) == 0
    out = capsys.readouterr()
    assert [json.loads(l)["completion"] for l in out.out.splitlines()] == want, source
    assert origin in out.err
  assert cli.main(["--run", str(run / "nope"), "x"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_load_run_rebuilds_the_quantized_base_and_keeps_regex_targets(tmp_path):
  """A run trained with --quantize nf4 and a regex target_modules: load_run gives the NF4 base
  (quantized here again, independently) and the regex, not its characters as names."""
  from train.checkpoint import TrainCheckpointer
  from train.config import TrainConfig
  from train.generate import load_base, load_run
  from train.loop import lora_config, run_fingerprint

  run = tmp_path / "qrun"
  cfg = TrainConfig(model="tiny-random", method="dora", quantize="nf4", rank=2, alpha=4.0,
                    targets=".*(q|v)_proj", output_dir=str(run))
  base = load_base(cfg.model)
  layouts = dora_jax.kernel_layouts(base.model, jnp.zeros((1, 8), jnp.int32))
  qparams = dora_jax.quantize(base.params, method="nf4", layouts=layouts)
  lcfg = lora_config(cfg)
  adapters = dora_jax.init_adapters(jax.random.key(0), qparams, lcfg)
  adapters = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(1), x.shape), adapters)
  with TrainCheckpointer(run / "checkpoints", run_fingerprint(cfg), async_save=False) as ckpt:
    ckpt.save(2, {"trainable": adapters, "rng": jax.random.key(0)}, force=True)
  (run / "metrics.json").write_text(json.dumps({"config": cfg.to_dict()}))
  gen = load_run(run, source="checkpoint")
  assert gen.lora_config.target_modules == ".*(q|v)_proj" and gen.lora_config == lcfg
  assert "nf4-quantized base" in gen.description
  q = dora_jax.tree.get_path(gen.params, "model/layers_0/self_attn/q_proj")["kernel"]
  want = dora_jax.tree.get_path(qparams, "model/layers_0/self_attn/q_proj")["kernel"]
  assert dora_jax.quant.is_quantized(q)
  np.testing.assert_array_equal(dora_jax.quant.dequantize(q), dora_jax.quant.dequantize(want))
  for got, ref in zip(jax.tree.leaves(gen.base_norms),
                      jax.tree.leaves(dora_jax.linen.base_norms(qparams, adapters))):
    np.testing.assert_allclose(got, ref, rtol=1e-6)  # QDoRA: the norms of the dequantized W0
