"""PEFT format per layer type and method against HF PEFT itself (torch): Conv 1-D/2-D/3-D and
Embedding (LoRA, DoRA), VeRA on Linear layers; ``PeftModel.from_pretrained`` loads our export
and computes our outputs, and PEFT's own saves import into adapters with our outputs equal to
PEFT's. Refusals: DVoRA, grouped convs, ambiguous kernels, tied embeddings, VeRA saved
without projections."""

import copy
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import dora_jax
from dora_jax import peft_format as pf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

RNG = np.random.default_rng(11)


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def perturb_magnitudes(adapters):
  """DoRA magnitudes off their init (``||W0||_c``) so the magnitude layout is exercised."""
  def f(path, x):
    if path[-1].key == "magnitude":
      return x * jnp.asarray(1.0 + 0.3 * rand(*x.shape))
    return x
  return jax.tree_util.tree_map_with_path(f, adapters)


def load_peft(torch_model, directory):
  """``PeftModel.from_pretrained`` that fails on missing or unexpected adapter keys."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(directory)).eval()
  bad = [str(w.message) for w in caught if "adapter keys" in str(w.message)]
  assert not bad, bad
  return model


def run_torch(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(x))).numpy()


# ---------------------------------------------------------------------------
# Conv 1-D / 2-D / 3-D


class FlaxConv(nn.Module):
  n: int  # spatial dims

  @nn.compact
  def __call__(self, x):  # [N, *S, C_in]
    return nn.Conv(5, (3,) * self.n, padding="VALID", name="conv")(x)


class TorchConv(torch.nn.Module):
  def __init__(self, n):
    super().__init__()
    self.conv = getattr(torch.nn, f"Conv{n}d")(4, 5, 3)

  def forward(self, x):
    return self.conv(x)


def conv_setup(n, use_dora):
  model, x = FlaxConv(n), jnp.asarray(rand(2, *(5,) * n, 4))
  params = model.init(jax.random.key(0), x)["params"]
  layouts = dora_jax.kernel_layouts(model, x)
  assert layouts["conv"].kind == "conv"
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=3.0, target_modules=["conv"], use_dora=use_dora,
                            init_lora_weights=False)
  adapters = perturb_magnitudes(dora_jax.init_adapters(jax.random.key(1), params, cfg,
                                                       layouts=layouts))
  tm = TorchConv(n).eval()
  k = np.asarray(params["conv"]["kernel"])  # [*k, C_in, C_out] -> [C_out, C_in, *k]
  tm.conv.weight.data = torch.from_numpy(np.ascontiguousarray(k.transpose(n + 1, n, *range(n))))
  tm.conv.bias.data = torch.from_numpy(np.asarray(params["conv"]["bias"]))
  return model, x, params, layouts, cfg, adapters, tm


def to_torch_layout(x, n):  # [N, *S, C] -> [N, C, *S]
  return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))


@pytest.mark.parametrize("n,use_dora", [(1, True), (2, True), (2, False), (3, True)])
def test_conv_export_loads_in_peft_with_equal_outputs(tmp_path, n, use_dora):
  model, x, params, layouts, cfg, adapters, tm = conv_setup(n, use_dora)
  with pytest.raises(ValueError, match="Pass layouts="):  # Conv and DenseGeneral look alike
    pf.export_peft(tmp_path, adapters, cfg, params=params)
  pf.export_peft(tmp_path, adapters, cfg, params=params, layouts=layouts)
  sd = pf.peft_state_dict(adapters, params=params, layouts=layouts)
  assert sd["base_model.model.conv.lora_A.weight"].shape == (2, 4, *(3,) * n)
  assert sd["base_model.model.conv.lora_B.weight"].shape == (5, 2, *(1,) * n)
  if use_dora:
    assert sd["base_model.model.conv.lora_magnitude_vector"].shape == (1, 5, *(1,) * n)
  ours = dora_jax.wrap(model.apply, cfg)({"params": params}, adapters, x)
  pm = load_peft(tm, tmp_path)
  got = run_torch(pm, to_torch_layout(x, n))
  np.testing.assert_allclose(np.moveaxis(got, 1, -1), ours, rtol=1e-5, atol=1e-5)
  base = run_torch(tm, to_torch_layout(x, n))
  assert np.abs(got - base).max() > 1e-2  # the adapter does something

  # PEFT's own save of that model imports into our adapters, exactly.
  pm.save_pretrained(str(tmp_path / "peft"))
  back, back_cfg = pf.import_peft(tmp_path / "peft", params)
  for leaf in adapters["conv"]:
    np.testing.assert_allclose(back["conv"][leaf], adapters["conv"][leaf], rtol=1e-6, atol=1e-7)
  assert (back_cfg.r, back_cfg.lora_alpha, back_cfg.use_dora) == (2, 3.0, use_dora)


def test_grouped_conv_refused(tmp_path):
  model, x, params, layouts, cfg, adapters, _ = conv_setup(2, True)
  grouped = {"conv": dora_jax.KernelLayout(layouts["conv"].stack, layouts["conv"].inputs,
                                           kind="grouped_conv")}
  with pytest.raises(ValueError, match="grouped conv.*merged"):
    pf.export_peft(tmp_path, adapters, cfg, params=params, layouts=grouped)
  other = {"conv": dora_jax.KernelLayout(0, 3, kind="conv_transpose")}
  with pytest.raises(ValueError, match="conv_transpose layer, which has no PEFT tensor layout"):
    pf.export_peft(tmp_path, adapters, cfg, params=params, layouts=other)
  # A grouped conv saved by PEFT (lora_B grouped: [C_out, r / groups, 1, 1]) is refused too.
  tm = torch.nn.Sequential()
  tm.conv = torch.nn.Conv2d(4, 4, 3, groups=2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=2, target_modules=["conv"],
                                                 init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "g"))
  flax_params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
  with pytest.raises(ValueError, match="grouped conv"):
    pf.import_peft(tmp_path / "g", flax_params)


# ---------------------------------------------------------------------------
# Embedding (untied, and tied to the head)


class FlaxEmbed(nn.Module):
  tied: bool = False

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 6, name="embed")
    h = jnp.tanh(emb(ids))
    return emb.attend(h) if self.tied else nn.Dense(11, use_bias=False, name="lm_head")(h)


class TorchEmbed(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(11, 6)
    self.lm_head = torch.nn.Linear(6, 11, bias=False)

  def forward(self, ids):
    return self.lm_head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_embedding_export_loads_in_peft_with_equal_outputs(tmp_path, use_dora):
  model, ids = FlaxEmbed(), jnp.asarray([[1, 4, 9, 0, 10]])
  params = model.init(jax.random.key(0), ids)["params"]
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=4.0, target_modules=["embed"], use_dora=use_dora,
                            init_lora_weights=False)
  adapters = perturb_magnitudes(dora_jax.init_adapters(jax.random.key(1), params, cfg))
  pf.export_peft(tmp_path, adapters, cfg, params=params)
  tm = TorchEmbed().eval()
  tm.embed.weight.data = torch.from_numpy(np.asarray(params["embed"]["embedding"]))
  tm.lm_head.weight.data = torch.from_numpy(np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T))
  pm = load_peft(tm, tmp_path)
  ours = dora_jax.wrap(model.apply, cfg)({"params": params}, adapters, ids)
  got = run_torch(pm, np.asarray(ids, np.int64))
  np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-5)
  assert np.abs(got - run_torch(tm, np.asarray(ids, np.int64))).max() > 1e-2
  pm.save_pretrained(str(tmp_path / "peft"))
  back, _ = pf.import_peft(tmp_path / "peft", params)
  for leaf in adapters["embed"]:
    np.testing.assert_allclose(back["embed"][leaf], adapters["embed"][leaf], rtol=1e-6)


def test_tied_embedding_flags(tmp_path):
  model, ids = FlaxEmbed(tied=True), jnp.asarray([[1, 4, 9]])
  params = model.init(jax.random.key(0), ids)["params"]
  assert "lm_head" not in params
  cfg = dora_jax.LoraConfig(r=2, target_modules=["embed"], init_lora_weights=False)
  adapters = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  pf.export_peft(tmp_path / "t", adapters, cfg, params=params)  # tied: the head gets PEFT's tied copy
  sd = load_file(tmp_path / "t" / "adapter_model.safetensors")
  np.testing.assert_array_equal(sd["base_model.model.lm_head.lora_A.weight"], adapters["embed"]["lora_b"])
  np.testing.assert_array_equal(sd["base_model.model.lm_head.lora_B.weight"], adapters["embed"]["lora_a"])
  tied_cfg = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
  assert tied_cfg["ensure_weight_tying"] is True and tied_cfg["target_modules"] == ["embed"]
  pf.export_peft(tmp_path / "u", adapters, cfg, params=params, tied_embeddings=False)  # caller's word
  assert not any("lm_head" in k for k in load_file(tmp_path / "u" / "adapter_model.safetensors"))
  assert "ensure_weight_tying" not in json.loads((tmp_path / "u" / "adapter_config.json").read_text())


# ---------------------------------------------------------------------------
# VeRA


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(7, name="fc1")(x)
    return nn.Dense(3, name="fc2")(jnp.tanh(h))


class TorchMLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.fc1, self.fc2 = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

  def forward(self, x):
    return self.fc2(torch.tanh(self.fc1(x)))


def mlp_setup():
  model, x = FlaxMLP(), jnp.asarray(rand(4, 5))
  params = model.init(jax.random.key(0), x)["params"]
  tm = TorchMLP().eval()
  for k in ("fc1", "fc2"):
    getattr(tm, k).weight.data = torch.from_numpy(np.ascontiguousarray(np.asarray(params[k]["kernel"]).T))
    getattr(tm, k).bias.data = torch.from_numpy(np.asarray(params[k]["bias"]))
  return model, x, params, tm


def test_vera_export_loads_in_peft_with_equal_outputs(tmp_path):
  model, x, params, tm = mlp_setup()
  cfg = dora_jax.VeraConfig(r=3, target_modules=["fc1", "fc2"], projection_prng_key=5,
                            save_projection=False)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  for k in ("fc1", "fc2"):
    ad[k] = {"vera_lambda_d": jnp.asarray(rand(3)),
             "vera_lambda_b": jnp.asarray(rand(ad[k]["vera_lambda_b"].shape[0]))}
  pf.export_peft(tmp_path, ad, cfg, params=params)
  sd = pf.peft_state_dict(ad, params=params)
  assert sd["base_model.vera_A"].shape == (3, 7)  # [r, I_max]
  assert sd["base_model.vera_B"].shape == (7, 3)  # [O_max, r]
  assert sd["base_model.model.fc2.vera_lambda_b"].shape == (3,)
  pm = load_peft(tm, tmp_path)
  assert pm.peft_config["default"].save_projection  # projections are always written
  got = run_torch(pm, x)
  ours = dora_jax.wrap(model.apply, cfg)({"params": params}, ad, x)
  np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-5)
  assert np.abs(got - run_torch(tm, x)).max() > 1e-2
  back, back_cfg = pf.import_peft(tmp_path, params)
  assert back_cfg == cfg
  for k in ("fc1", "fc2"):
    for leaf in ad[k]:
      np.testing.assert_array_equal(back[k][leaf], ad[k][leaf])
  np.testing.assert_array_equal(back["shared"]["vera_A"], ad["shared"]["vera_A"])


def test_vera_import_of_peft_save_matches_peft(tmp_path):
  model, x, params, tm = mlp_setup()
  torch.manual_seed(0)
  pm = peft.get_peft_model(copy.deepcopy(tm), peft.VeraConfig(r=4, target_modules=["fc1", "fc2"]))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "vera_lambda" in name:
        p.copy_(torch.randn(p.shape))
  pm.eval()
  pm.save_pretrained(str(tmp_path / "v"))
  ad, cfg = pf.import_peft(tmp_path / "v", params)
  assert isinstance(cfg, dora_jax.VeraConfig) and cfg.r == 4 and not cfg.use_dora
  assert ad["shared"]["vera_A"].shape == (7, 4) and ad["shared"]["vera_B"].shape == (4, 7)
  ours = dora_jax.wrap(model.apply, cfg)({"params": params}, ad, x)
  np.testing.assert_allclose(ours, run_torch(pm, x), rtol=1e-5, atol=1e-5)

  # Without saved projections PEFT re-draws them with torch's generator: refused.
  pm2 = peft.get_peft_model(copy.deepcopy(tm), peft.VeraConfig(r=4, target_modules=["fc1", "fc2"],
                                                               save_projection=False))
  pm2.save_pretrained(str(tmp_path / "np"))
  with pytest.raises(ValueError, match="save_projection=False.*torch's generator"):
    pf.import_peft(tmp_path / "np", params)


def test_dvora_peft_export_refused(tmp_path):
  model, x, params, _ = mlp_setup()
  cfg = dora_jax.VeraConfig(r=3, target_modules=["fc1", "fc2"], use_dora=True)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  with pytest.raises(ValueError, match="^export_peft cannot write DVoRA .*PEFT has no DVoRA"):
    pf.export_peft(tmp_path, ad, cfg, params=params)
  with pytest.raises(ValueError, match="DVoRA"):
    pf.peft_state_dict(ad, params=params)
  assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Tied embeddings on a Llama (transformers): PEFT's ensure_weight_tying is our semantics


def test_tied_embedding_lora_export_matches_peft_tied_dora_refused(tmp_path):
  transformers = pytest.importorskip("transformers")
  from dora_jax.models import hf
  from dora_jax.models.llama import Llama

  torch.manual_seed(0)
  tm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)).eval()
  tm.save_pretrained(str(tmp_path / "base"))
  config, params = hf.load_pretrained(tmp_path / "base")
  ids = np.asarray([[1, 5, 9, 3, 15]])
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=4.0, target_modules=["embed_tokens", "q_proj"],
                            init_lora_weights=False)
  adapters = dora_jax.init_adapters(jax.random.key(3), params, cfg)
  pf.export_peft(tmp_path / "a", adapters, cfg, params=params, task_type="CAUSAL_LM")
  pm = load_peft(tm, tmp_path / "a")
  with torch.no_grad():
    got = pm(torch.from_numpy(ids)).logits.numpy()
    base = tm(torch.from_numpy(ids)).logits.numpy()
  ours = dora_jax.wrap(Llama(config).apply, cfg)(params, adapters, jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-5)
  assert np.abs(got - base).max() > 1e-2
  # Without ensure_weight_tying PEFT adapts the lookup only: the export would be unfaithful.
  plain = dora_jax.LoraConfig(r=2, lora_alpha=4.0, target_modules=["q_proj"], init_lora_weights=False)
  assert np.abs(got - np.asarray(dora_jax.wrap(Llama(config).apply, plain)(
      params, {"model": {"layers_0": adapters["model"]["layers_0"]}},
      jnp.asarray(ids, jnp.int32)))).max() > 1e-2  # the embedding's adapter acts in the head too
  # PEFT's own save (with the head's tied copy) imports back.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm.save_pretrained(str(tmp_path / "peft"))
    back, _ = pf.import_peft(tmp_path / "peft", params)
  for leaf in ("lora_a", "lora_b"):
    np.testing.assert_allclose(back["model"]["embed_tokens"][leaf],
                               adapters["model"]["embed_tokens"][leaf], rtol=1e-6)
  assert "lm_head" not in back

  dcfg = dora_jax.LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True)
  dad = dora_jax.init_adapters(jax.random.key(3), params, dcfg)
  with pytest.raises(ValueError, match="DoRA on an embedding that the model also uses as its LM head"):
    pf.export_peft(tmp_path / "d", dad, dcfg, params=params)


@pytest.mark.parametrize("use_dora", [False, True])
def test_rank_and_alpha_pattern_export_loads_in_peft(tmp_path, use_dora):
  model, x, params, tm = mlp_setup()
  cfg = dora_jax.LoraConfig(r=2, lora_alpha=4.0, target_modules=["fc1", "fc2"], use_dora=use_dora,
                            rank_pattern={"fc2": 3}, alpha_pattern={"fc2": 9.0},
                            init_lora_weights=False)
  ad = perturb_magnitudes(dora_jax.init_adapters(jax.random.key(1), params, cfg))
  assert ad["fc2"]["lora_a"].shape == (7, 3) and ad["fc1"]["lora_a"].shape == (5, 2)
  pf.export_peft(tmp_path, ad, cfg, params=params)
  got = run_torch(load_peft(tm, tmp_path), x)
  ours = dora_jax.wrap(model.apply, cfg)({"params": params}, ad, x)
  np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-5)
  back, back_cfg = pf.import_peft(tmp_path, params)
  assert back_cfg.for_module("fc2").r == 3 and back_cfg.for_module("fc2").lora_alpha == 9.0


def test_kernel_layouts_mark_grouped_and_transposed_convs(tmp_path):
  class Convs(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)
      return nn.ConvTranspose(4, (3, 3), name="transposed")(x)

  model, x = Convs(), jnp.ones((1, 6, 6, 4))
  layouts = dora_jax.kernel_layouts(model, x)
  assert layouts["grouped"].kind == "grouped_conv" and layouts["transposed"].kind == "conv_transpose"
  params = model.init(jax.random.key(0), x)["params"]
  cfg = dora_jax.LoraConfig(r=2, target_modules=["grouped"])
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg, layouts=layouts)
  with pytest.raises(ValueError, match="grouped conv"):
    pf.export_peft(tmp_path, ad, cfg, params=params, layouts=layouts)
