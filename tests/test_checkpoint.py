"""Checkpoints: adapter-only Orbax save/load, TrainCheckpointer, PEFT export/import."""

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import dora_jax
from dora_jax import checkpoint as ckpt
from dora_jax.tree import KernelLayout

L, D, KV, F, V, R = 3, 8, 4, 12, 16, 2
TARGETS = ("q_proj", "v_proj", "down_proj", "embed_tokens")


def _rand(seed, shape, dtype=np.float32):
  """numpy randoms (jax.random compiles once per shape: slow on a small CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def unscanned_params(d=D):
  """A Llama-shaped params tree with one entry per layer (``layers_{i}``)."""
  layers = {
      f"layers_{i}": {
          "self_attn": {
              "q_proj": {"kernel": _rand(10 * i + 1, (d, d))},
              "v_proj": {"kernel": _rand(10 * i + 2, (d, KV))},
          },
          "mlp": {"down_proj": {"kernel": _rand(10 * i + 3, (F, d))}},
          "input_layernorm": {"scale": jnp.ones((d,))},
      }
      for i in range(L)
  }
  return {
      "model": {"embed_tokens": {"embedding": _rand(99, (V, d))}, **layers},
      "lm_head": {"kernel": _rand(98, (d, V))},
  }


def _stack_layers(tree):
  """``model/layers_{i}/...`` -> ``model/layers/...`` with a leading layer axis."""
  model = dict(tree["model"])
  layers = [model.pop(f"layers_{i}") for i in range(L)]
  model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**tree, "model": model}


def scanned_params():
  """The same weights with the layers stacked on a leading axis (``nn.scan``)."""
  return _stack_layers(unscanned_params())


SCANNED_LAYOUTS = {
    f"model/layers/{m}": KernelLayout(stack=1, inputs=1)
    for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")
}


def _adapter(seed, i_dim, o_dim, use_dora, dtype):
  out = {"lora_a": _rand(seed, (i_dim, R)), "lora_b": _rand(seed + 1, (R, o_dim))}
  if use_dora:
    out["magnitude"] = jnp.abs(_rand(seed + 2, (o_dim,))) + 0.5
  return {k: v.astype(dtype) for k, v in out.items()}


def make(scanned=False, use_dora=True, dtype=jnp.float32):
  """Params, random (nonzero) adapters on TARGETS, and their config."""
  config = dora_jax.LoraConfig(r=R, lora_alpha=4.0, target_modules=TARGETS, use_dora=use_dora,
                               init_lora_weights=False, adapter_dtype=dtype)
  dims = {"self_attn": {"q_proj": (D, D), "v_proj": (D, KV)}, "mlp": {"down_proj": (F, D)}}
  adapters = {"model": {"embed_tokens": _adapter(500, V, D, use_dora, dtype)}}
  for i in range(L):
    adapters["model"][f"layers_{i}"] = {
        sub: {mod: _adapter(100 * i + 10 * j, *io, use_dora, dtype)
              for j, (mod, io) in enumerate(mods.items())}
        for sub, mods in dims.items()
    }
  if scanned:
    return scanned_params(), _stack_layers(adapters), config
  return unscanned_params(), adapters, config


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# Adapter-only checkpoints


@pytest.mark.parametrize("scanned", [False, True])
def test_save_load_roundtrip_is_bitwise(tmp_path, scanned):
  params, adapters, config = make(scanned, dtype=jnp.bfloat16)
  ckpt.save_adapters(tmp_path / "a", adapters, config, step=12, metadata={"note": "x"},
                     params=params)
  loaded, cfg = ckpt.load_adapters(tmp_path / "a", config, params=params)
  assert cfg == config
  assert_trees_equal(loaded, adapters)
  info = ckpt.read_adapter_info(tmp_path / "a")
  assert info["step"] == 12 and info["metadata"] == {"note": "x"}
  assert info["dora_jax_version"] == dora_jax.__version__
  assert info["base_fingerprint"] == ckpt.params_fingerprint(params)
  q = "model/layers/self_attn/q_proj" if scanned else "model/layers_0/self_attn/q_proj"
  assert info["adapters"][q]["lora_a"]["dtype"] == "bfloat16"


def test_load_places_arrays_with_given_shardings(tmp_path):
  params, adapters, config = make()
  ckpt.save_adapters(tmp_path / "a", adapters, config)
  dev = jax.devices()[0]
  one = jax.sharding.SingleDeviceSharding(dev)
  loaded, _ = ckpt.load_adapters(tmp_path / "a", shardings=one)
  assert all(x.sharding == one for x in jax.tree.leaves(loaded))
  mesh = jax.sharding.Mesh(np.array([dev]), ("x",))
  tree = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                      adapters)
  loaded, _ = ckpt.load_adapters(tmp_path / "a", shardings=tree)
  assert_trees_equal(loaded, adapters)
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(loaded))
  bad = {"model": {"embed_tokens": tree["model"]["embed_tokens"]}}
  with pytest.raises(ValueError, match="mirror the saved adapters"):
    ckpt.load_adapters(tmp_path / "a", shardings=bad)


def test_load_refuses_other_config_naming_fields(tmp_path):
  _, adapters, config = make()
  ckpt.save_adapters(tmp_path / "a", adapters, config)
  other = dora_jax.LoraConfig(r=R, lora_alpha=8.0, target_modules=TARGETS, use_dora=False,
                              init_lora_weights=False)
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    ckpt.load_adapters(tmp_path / "a", other)
  msg = str(e.value)
  assert "lora_alpha: saved 4.0, expected 8.0" in msg and "use_dora" in msg
  assert "target_modules" not in msg and "r:" not in msg


def test_load_refuses_adapters_that_do_not_fit_naming_path(tmp_path):
  _, adapters, config = make()
  ckpt.save_adapters(tmp_path / "a", adapters, config)
  wider = unscanned_params(d=D + 2)
  with pytest.raises(ckpt.CheckpointMismatchError, match="model/embed_tokens|model/layers_0"):
    ckpt.load_adapters(tmp_path / "a", config, params=wider)
  with pytest.raises(ckpt.CheckpointMismatchError, match="model/layers/self_attn/q_proj"):
    ckpt.load_adapters(tmp_path / "a", config, params=scanned_params())


def test_save_refuses_to_clobber_and_load_needs_sidecar(tmp_path):
  _, adapters, config = make()
  ckpt.save_adapters(tmp_path / "a", adapters, config)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    ckpt.save_adapters(tmp_path / "a", adapters, config)
  doubled = jax.tree.map(lambda x: 2 * x, adapters)
  ckpt.save_adapters(tmp_path / "a", doubled, config, overwrite=True)
  assert_trees_equal(ckpt.load_adapters(tmp_path / "a")[0], doubled)
  os.remove(tmp_path / "a" / ckpt.SIDECAR_NAME)
  with pytest.raises(FileNotFoundError, match="dora_jax.json"):
    ckpt.load_adapters(tmp_path / "a")


# ---------------------------------------------------------------------------
# Training state


def train_state(seed=0):
  _, adapters, config = make()
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  # Nonzero moments and count, via numpy (eager jax ops compile per shape: slow here).
  opt_state = jax.tree.map(lambda x: jnp.asarray((np.asarray(x) + 3).astype(x.dtype)),
                           opt.init(adapters))
  return {"adapters": adapters, "opt_state": opt_state, "rng": jax.random.key(seed),
          "legacy_rng": jax.random.PRNGKey(seed)}, config


def test_train_checkpointer_keeps_last_k_and_restores(tmp_path):
  state, config = train_state()
  with ckpt.TrainCheckpointer(tmp_path, config, keep=2, save_every=2) as c:
    assert c.latest_step() is None
    for step in range(1, 8):
      s = jax.tree.map(lambda x: x, state)
      s["adapters"] = jax.tree.map(lambda x, step=step: jnp.asarray(np.asarray(x) + step),
                                   state["adapters"])
      saved = c.save(step, {**s, "data_state": {"epoch": 0, "offset": step * 10}})
      assert saved == (step % 2 == 0)
    assert c.save(7, {**s, "data_state": {"offset": 70}}, force=True)
    c.wait()
    assert c.all_steps() == [6, 7] and c.latest_step() == 7
    restored = c.restore(target=state)
  assert restored["step"] == 7 and restored["data_state"] == {"offset": 70}
  assert_trees_equal(restored["adapters"], s["adapters"])
  assert_trees_equal(restored["opt_state"], state["opt_state"])  # NamedTuples come back
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(state["rng"]))
  np.testing.assert_array_equal(restored["legacy_rng"], state["legacy_rng"])

  with ckpt.TrainCheckpointer(tmp_path, config, keep=2, save_every=2) as c:  # resume
    r6 = c.restore(step=6, target=jax.eval_shape(lambda: state))
    assert r6["data_state"] == {"epoch": 0, "offset": 60}
    plain = c.restore()  # no target: dicts and lists, keys still typed
    assert_trees_equal(plain["adapters"], s["adapters"])
    assert jax.dtypes.issubdtype(plain["rng"].dtype, jax.dtypes.prng_key)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    by_sharding = c.restore(target=jax.tree.map(lambda _: one, state))
    assert_trees_equal(by_sharding["opt_state"], state["opt_state"])
    with pytest.raises(FileNotFoundError, match="steps: \\[6, 7\\]"):
      c.restore(step=3)
    with pytest.raises(ckpt.CheckpointMismatchError, match="lacks"):
      c.restore(target={"adapters": state["adapters"]})


def test_train_checkpointer_refuses_other_config(tmp_path):
  state, config = train_state()
  with ckpt.TrainCheckpointer(tmp_path, {"lora": config.to_dict(), "lr": 1e-3, "steps": 10}) as c:
    c.save(1, state)
  other = {"lora": {**config.to_dict(), "r": 4}, "lr": 1e-3, "steps": 20}
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    ckpt.TrainCheckpointer(tmp_path, other)
  msg = str(e.value)
  assert "lora.r: saved 2, expected 4" in msg and "steps" in msg
  assert "new directory" in msg and "overwrite=True" in msg
  # Fields the caller allows to change (e.g. a longer schedule) do not block a resume.
  extended = {"lora": config.to_dict(), "lr": 1e-3, "steps": 20}
  with ckpt.TrainCheckpointer(tmp_path, extended, ignore_fields=("steps",)) as c:
    assert c.latest_step() == 1
  with ckpt.TrainCheckpointer(tmp_path, other, overwrite=True) as c:
    assert c.latest_step() is None
    c.save(1, state)
  with ckpt.TrainCheckpointer(tmp_path, other) as c:
    assert c.latest_step() == 1
    c.save(3, state)
    with pytest.raises(ValueError, match="already holds step 3"):
      c.save(2, state)  # a restarted loop would interleave two runs


# ---------------------------------------------------------------------------
# PEFT format


def test_peft_names_and_layouts(tmp_path):
  params, adapters, config = make()
  ckpt.export_peft(tmp_path, adapters, config, params=params, base_model_name_or_path="tiny")
  t = load_file(tmp_path / "adapter_model.safetensors")
  pre = "base_model.model.model."
  q = adapters["model"]["layers_1"]["self_attn"]["q_proj"]
  np.testing.assert_array_equal(t[pre + "layers.1.self_attn.q_proj.lora_A.weight"], q["lora_a"].T)
  np.testing.assert_array_equal(t[pre + "layers.1.self_attn.q_proj.lora_B.weight"], q["lora_b"].T)
  np.testing.assert_array_equal(t[pre + "layers.1.self_attn.q_proj.lora_magnitude_vector"],
                                q["magnitude"])
  assert t[pre + "layers.0.self_attn.v_proj.lora_A.weight"].shape == (R, D)  # [r, in]
  assert t[pre + "layers.0.self_attn.v_proj.lora_B.weight"].shape == (KV, R)  # [out, r]
  assert t[pre + "layers.2.mlp.down_proj.lora_A.weight"].shape == (R, F)
  assert t[pre + "layers.2.mlp.down_proj.lora_magnitude_vector"].shape == (D,)
  assert t[pre + "embed_tokens.lora_embedding_A"].shape == (R, V)  # [r, vocab]
  assert t[pre + "embed_tokens.lora_embedding_B"].shape == (D, R)  # [dim, r]
  assert t[pre + "embed_tokens.lora_magnitude_vector"].shape == (D,)
  assert len(t) == 3 * (L * 3 + 1)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["r"] == R
  assert cfg["lora_alpha"] == 4 and cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False
  assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == "tiny"
  assert sorted(cfg["target_modules"]) == sorted(TARGETS)


@pytest.mark.parametrize("scanned", [False, True])
def test_peft_export_import_roundtrip(tmp_path, scanned):
  params, adapters, config = make(scanned)
  ckpt.export_peft(tmp_path, adapters, config, params=params)
  loaded, cfg = ckpt.import_peft(tmp_path, params)
  assert cfg == config
  assert_trees_equal(loaded, adapters)


def test_peft_scanned_and_unscanned_exports_agree(tmp_path):
  params_s, adapters_s, config = make(scanned=True, use_dora=False)
  ckpt.export_peft(tmp_path / "s", adapters_s, config, params=params_s, dtype=jnp.bfloat16)
  a = load_file(tmp_path / "s" / "adapter_model.safetensors")
  assert all(v.dtype == jnp.bfloat16 for v in a.values())
  # A scanned export loads into the unscanned model layer by layer, and back.
  params_u = unscanned_params()
  loaded_u, cfg = ckpt.import_peft(tmp_path / "s", params_u)
  assert cfg.adapter_dtype == jnp.bfloat16 and not cfg.use_dora
  for i in range(L):
    got = loaded_u["model"][f"layers_{i}"]["self_attn"]["q_proj"]["lora_a"]
    want = adapters_s["model"]["layers"]["self_attn"]["q_proj"]["lora_a"][i]
    np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))
  ckpt.export_peft(tmp_path / "u", loaded_u, cfg, params=params_u)
  b = load_file(tmp_path / "u" / "adapter_model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_peft_import_errors(tmp_path):
  params, adapters, config = make()
  ckpt.export_peft(tmp_path, adapters, config, params=params)
  no_v = unscanned_params()
  for i in range(L):
    del no_v["model"][f"layers_{i}"]["self_attn"]["v_proj"]
  with pytest.raises(ValueError, match="params lack.*layers.0.self_attn.v_proj"):
    ckpt.import_peft(tmp_path, no_v)
  with pytest.raises(ValueError, match="does not fit the params: Adapter at 'model/"):
    ckpt.import_peft(tmp_path, unscanned_params(d=D + 2))
  # A stacked module needs every layer.
  two = dict(load_file(tmp_path / "adapter_model.safetensors"))
  two = {k: v for k, v in two.items() if ".layers.2." not in k}
  from safetensors.numpy import save_file
  save_file(two, str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="missing indices \\[\\(2,\\)\\]"):
    ckpt.import_peft(tmp_path, scanned_params())
  # Unknown tensors are named.
  two["base_model.model.model.norm.weight"] = np.ones(D, np.float32)
  save_file(two, str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="model.norm.weight"):
    ckpt.import_peft(tmp_path, unscanned_params())


def test_peft_module_names():
  name = ckpt.peft_module_name
  assert name("model/layers_3/self_attn/q_proj") == "model.layers.3.self_attn.q_proj"
  assert name("model/layers/mlp/up_proj", (5,)) == "model.layers.5.mlp.up_proj"
  with pytest.raises(ValueError, match="module_name_map"):
    name("transformer/blocks/attn", (0,))
  custom = lambda path, index: name(path.replace("blocks", "layers"), index)
  params = {"transformer": {"blocks": {"attn": {"kernel": _rand(0, (2, D, D))}}}}
  config = dora_jax.LoraConfig(r=R, target_modules=["attn"], init_lora_weights=False)
  adapters = {"transformer": {"blocks": {"attn": {"lora_a": _rand(1, (2, D, R)),
                                                  "lora_b": _rand(2, (2, R, D))}}}}
  sd = ckpt.peft_state_dict(adapters, module_name_map=custom)
  assert sorted(sd) == [f"base_model.model.transformer.layers.{i}.attn.lora_{x}.weight"
                        for i in range(2) for x in "AB"]


# ---------------------------------------------------------------------------
# Multi-device: save on one mesh, restore on another (subprocess with 8 CPU devices)


RESHARD_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dora_jax
    from dora_jax import checkpoint as ckpt
    root = sys.argv[1]
    params = {"layers": {"q": {"kernel": jnp.ones((4, 16, 8))}}}
    cfg = dora_jax.LoraConfig(r=4, target_modules=["q"], use_dora=True, init_lora_weights=False)
    rng = np.random.default_rng(0)
    ad = {"layers": {"q": {"lora_a": jnp.asarray(rng.standard_normal((4, 16, 4)), jnp.float32),
                           "lora_b": jnp.asarray(rng.standard_normal((4, 4, 8)), jnp.float32),
                           "magnitude": jnp.asarray(rng.random((4, 8)), jnp.float32)}}}
    m8 = Mesh(np.array(jax.devices()).reshape(4, 2), ("stage", "model"))
    on8 = {"layers": {"q": {"lora_a": NamedSharding(m8, P("stage", "model")),
                            "lora_b": NamedSharding(m8, P("stage", None, "model")),
                            "magnitude": NamedSharding(m8, P("stage", "model"))}}}
    ad8 = jax.device_put(ad, on8)
    ckpt.save_adapters(root + "/a", ad8, cfg)
    m2 = Mesh(np.array(jax.devices()[:2]), ("model",))
    on2 = jax.tree.map(lambda s: NamedSharding(m2, P(None, "model")), on8)
    back, _ = ckpt.load_adapters(root + "/a", cfg, params=params, shardings=on2)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
      assert x.sharding.mesh.shape == {"model": 2}, x.sharding
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    opt = optax.adam(1e-3)
    state = {"adapters": ad8, "opt_state": opt.init(ad8), "rng": jax.random.key(1)}
    with ckpt.TrainCheckpointer(root + "/t", cfg) as c:
      c.save(1, state)
    with ckpt.TrainCheckpointer(root + "/t", cfg) as c:
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
          sharding=NamedSharding(m2, P())), jax.eval_shape(lambda: state))
      r = c.restore(target=target)
    assert r["opt_state"][0].mu["layers"]["q"]["lora_a"].sharding.mesh.shape == {"model": 2}
    np.testing.assert_array_equal(np.asarray(r["adapters"]["layers"]["q"]["lora_b"]),
                                  np.asarray(ad["layers"]["q"]["lora_b"]))
    print("OK")
""")


@pytest.mark.multidevice
def test_reshard_between_meshes(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", RESHARD_SCRIPT, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------
# Optional: HF PEFT loads our export and computes what dora_jax computes


def test_peft_loads_export_and_matches_merge(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
  hf = transformers.LlamaForCausalLM(hf_config).eval()
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

  def kernel(name):  # torch Linear [out, in] -> Flax [in, out]
    return jnp.asarray(sd[name].T)

  names = [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]
  layers = {
      sub: {mod: {"kernel": jnp.stack([kernel(f"model.layers.{i}.{sub}.{mod}.weight")
                                       for i in range(L)])}
            for s, mod in names if s == sub}
      for sub in ("self_attn", "mlp")
  }
  params = {"model": {"embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])},
                      "layers": layers}}
  _, adapters, config = make(scanned=True)  # random A, B and magnitudes
  ckpt.export_peft(tmp_path, adapters, config, params=params)

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
  assert not [w for w in caught if "missing adapter keys" in str(w.message)]
  peft_sd = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
  ours = load_file(tmp_path / "adapter_model.safetensors")
  assert peft_sd.keys() == ours.keys()  # the same tensors, by the same names
  for k in ours:
    np.testing.assert_array_equal(peft_sd[k].numpy(), ours[k])

  merged = jax.jit(lambda p, a: dora_jax.merge(p, a, config))(params, adapters)
  for i in range(L):
    for sub, mod in names:
      sd[f"model.layers.{i}.{sub}.{mod}.weight"] = np.asarray(
          merged["model"]["layers"][sub][mod]["kernel"][i]).T
  sd["model.embed_tokens.weight"] = np.asarray(merged["model"]["embed_tokens"]["embedding"])
  hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
  ids = torch.tensor([[1, 5, 9, 3, 15, 2]])
  with torch.no_grad():
    want = hf(ids).logits.numpy()
    got = model(ids).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # And the other way: PEFT's own save of that model imports back into our tree.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.save_pretrained(str(tmp_path / "from_peft"))
  with pytest.warns(UserWarning, match="base weights"):  # PEFT saved the embedding too
    back, cfg = ckpt.import_peft(tmp_path / "from_peft", params)
  assert_trees_equal(back, adapters)
  assert (cfg.r, cfg.lora_alpha, cfg.use_dora) == (R, 4.0, True)
  assert sorted(cfg.target_modules) == sorted(TARGETS)
