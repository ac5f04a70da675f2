"""HF PEFT's format: export_peft / import_peft names, layouts, round trips, errors, and
(optionally) PEFT itself loading our export."""

import copy
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _adapter_trees import (
    D, F, KV, L, R, TARGETS, V, _rand, assert_trees_equal, make, scanned_params, unscanned_params,
)
from safetensors.numpy import load_file

import dora_jax
from dora_jax import peft_format as ckpt


def test_peft_names_and_layouts(tmp_path):
  params, adapters, config = make()
  ckpt.export_peft(tmp_path, adapters, config, params=params, base_model_name_or_path="tiny",
                   task_type="CAUSAL_LM")
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
  ckpt.export_peft(tmp_path / "plain", adapters, config, params=params)  # default: no task type
  assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["task_type"] is None


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
  with pytest.raises(ValueError, match="also uses as its LM head"):  # no lm_head in params
    ckpt.export_peft(tmp_path, adapters, config, params=params)
  ckpt.export_peft(tmp_path, adapters, config, params=params, tied_embeddings=False)

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
