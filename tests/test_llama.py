"""The Flax Llama against an independent numpy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dora_jax.models.llama import Llama, LlamaConfig, attention_mask

CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)


def np_rms(x, w, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):  # x [T, H, hd], HF rotate_half
  hd = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = pos[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
  rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
  return x * cos + rot * sin


def np_llama(params, ids, cfg, valid=None):
  """One sequence ``ids [T]``; ``valid [T]`` bool marks real tokens (right padding)."""
  p = jax.tree.map(lambda t: np.asarray(t, np.float64), nn.unbox(params))
  t = len(ids)
  x = p["model"]["embed_tokens"]["embedding"][ids]
  pos = np.arange(t, dtype=np.float64)
  hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
  allowed = np.tril(np.ones((t, t), bool))
  if valid is not None:
    allowed &= valid[None, :]
  for i in range(cfg.num_hidden_layers):
    lp = p["model"][f"layers_{i}"]
    a = lp["self_attn"]
    h = np_rms(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
    proj = lambda name, n: (h @ a[name]["kernel"] + a[name].get("bias", 0)).reshape(t, n, hd)
    q, k, v = np_rope(proj("q_proj", nh), pos, cfg.rope_theta), np_rope(proj("k_proj", nkv), pos, cfg.rope_theta), proj("v_proj", nkv)
    out = np.zeros((t, nh, hd))
    for head in range(nh):
      kv = head // (nh // nkv)
      s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
      s = np.where(allowed, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[:, head] = w @ v[:, kv]
    x = x + out.reshape(t, nh * hd) @ a["o_proj"]["kernel"]
    m = lp["mlp"]
    h = np_rms(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    g = h @ m["gate_proj"]["kernel"]
    x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
  x = np_rms(x, p["model"]["norm"]["scale"], cfg.rms_norm_eps)
  head = p["model"]["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"]
  return x @ head


def _init(cfg, scan=False, seed=0):
  model = Llama(cfg, scan_layers=scan)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(seed), ids)["params"]
  # Non-trivial norms and biases so they are checked too.
  params = jax.tree.map(lambda t: t + 0.05 * jax.random.normal(jax.random.key(7), t.shape), nn.unbox(params))
  return model, params


@pytest.mark.parametrize("variant", ["llama", "qwen2-bias-tied"])
def test_forward_matches_numpy(variant):
  cfg = CFG if variant == "llama" else LlamaConfig(**{**CFG.__dict__, "attention_bias": True,
                                                      "tie_word_embeddings": True, "model_type": "qwen2"})
  model, params = _init(cfg)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7))
  got = model.apply({"params": params}, jnp.asarray(ids))
  for b in range(2):
    np.testing.assert_allclose(got[b], np_llama(params, ids[b], cfg), rtol=2e-4, atol=2e-4)


def test_padding_mask_and_scan_equivalence():
  model, params = _init(CFG)
  ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 6))
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
  got = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  ref = np_llama(params, ids[1], CFG, valid=mask[1].astype(bool))
  np.testing.assert_allclose(got[1, :4], ref[:4], rtol=2e-4, atol=2e-4)
  assert np.all(np.isfinite(np.asarray(got)))
  # The same weights stacked under nn.scan give the same logits.
  scanned = Llama(CFG, scan_layers=True)
  layers = [params["model"].pop(f"layers_{i}") for i in range(CFG.num_hidden_layers)]
  sparams = {**params, "model": {**params["model"], "layers": jax.tree.map(lambda *t: jnp.stack(t), *layers)}}
  np.testing.assert_allclose(scanned.apply({"params": sparams}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
                             got, rtol=1e-5, atol=1e-5)


def test_packed_segments_are_independent():
  model, params = _init(CFG)
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, CFG.vocab_size, 4), rng.integers(0, CFG.vocab_size, 3)
  packed = np.concatenate([a, b])[None]
  seg = np.array([[1, 1, 1, 1, 2, 2, 2]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2]])
  got = model.apply({"params": params}, jnp.asarray(packed), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  np.testing.assert_allclose(got[0, 4:], np_llama(params, b, CFG), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(got[0, :4], np_llama(params, a, CFG), rtol=2e-4, atol=2e-4)


def test_mask_shapes_and_config_roundtrip():
  assert attention_mask(3, None, None) is None  # plain causal: is_causal=True
  m = attention_mask(3, jnp.array([[1, 1, 0]]), None)
  assert m.shape == (1, 1, 3, 3) and not bool(m[0, 0, 1, 2]) and bool(m[0, 0, 2, 2])
  assert LlamaConfig.from_hf(CFG.to_hf_dict()) == CFG
  with pytest.raises(ValueError, match="Unsupported model_type"):
    LlamaConfig.from_hf({**CFG.to_hf_dict(), "model_type": "gpt2"})
  assert CFG.num_params() == sum(x.size for x in jax.tree.leaves(_init(CFG)[1]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_matches_numpy_forward_and_gradients(dtype):
  """``silu(g) ⊙ u`` and its written backward against float64 formulas:
  ∇g = ∇h ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), ∇u = ∇h ⊙ g σ(g)."""
  from dora_jax.models.llama import swiglu

  rng = np.random.default_rng(0)
  g64, u64, d64 = (4.0 * rng.standard_normal((3, 5, 7)) for _ in range(3))
  h, vjp = jax.vjp(swiglu, jnp.asarray(g64, dtype), jnp.asarray(u64, dtype))
  d_g, d_u = vjp(jnp.asarray(d64, dtype))
  assert h.dtype == d_g.dtype == d_u.dtype == dtype
  g64, u64, d64 = (np.asarray(jnp.asarray(t, dtype), np.float64) for t in (g64, u64, d64))
  sig = 1.0 / (1.0 + np.exp(-g64))
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
  np.testing.assert_allclose(np.asarray(h, np.float64), g64 * sig * u64, **tol)
  np.testing.assert_allclose(np.asarray(d_g, np.float64), d64 * u64 * sig * (1 + g64 * (1 - sig)), **tol)
  np.testing.assert_allclose(np.asarray(d_u, np.float64), d64 * g64 * sig, **tol)
