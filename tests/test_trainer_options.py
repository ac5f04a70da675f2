"""Trainer options on the tiny random Llama: LoRA+ (--loraplus-lr-ratio), the PEFT export's
task type and refusals, sample generations at evaluation time."""

import jax
import numpy as np
import pytest

import dora_jax
from train import steps as steps_lib
from train.config import load_config, make_config
from train.loop import lora_config
from train.modeling import load_base_model


@pytest.fixture(scope="module")
def dora_grads():
  """The tiny model's DoRA adapters (q_proj, v_proj) and their gradient on one batch."""
  cfg = make_config({"model": "tiny-random", "method": "dora", "rank": 4, "alpha": 8.0,
                     "target_modules": ["q_proj", "v_proj"]})
  base = load_base_model(cfg)
  lcfg = lora_config(cfg)
  adapters = dora_jax.init_adapters(jax.random.key(0), base.params, lcfg)
  forward = steps_lib.make_forward(dora_jax.models.Llama(base.config), "dora", lcfg)
  ids = np.random.default_rng(0).integers(3, base.config.vocab_size, (2, 12)).astype(np.int32)
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones_like(ids),
           "attention_mask": np.ones_like(ids)}
  loss = lambda a: steps_lib.token_nll(forward(steps_lib.frozen_inputs(base.params), a, batch, None, False),
                                       batch["targets"], batch["loss_mask"])[0]
  return adapters, jax.jit(jax.grad(loss))(adapters)


def _first_update(adapters, grads, ratio: float):
  tx, _ = steps_lib.make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=0, min_lr_ratio=1.0,
                                   weight_decay=0.0, grad_clip=1.0, method="dora",
                                   loraplus_lr_ratio=ratio)
  updates, _ = jax.jit(tx.update)(grads, tx.init(adapters), adapters)
  return {(p, k): np.asarray(v) for p, ad in dora_jax.tree.flatten_adapters(updates).items()
          for k, v in ad.items()}


def test_loraplus_lr_ratio_scales_b_and_magnitude_updates(dora_grads):
  """Adam's first update is lr * g / (|g| + eps): with LoRA+ ratio 16, lora_b's and the
  magnitude's updates are 16x those at ratio 1; lora_a's (zero gradient at B = 0) stay 0."""
  one, sixteen = _first_update(*dora_grads, 1.0), _first_update(*dora_grads, 16.0)
  assert one.keys() == sixteen.keys()
  seen = set()
  for key, u1 in one.items():
    u16 = sixteen[key]
    leaf = key[1]
    seen.add(leaf)
    if leaf == "lora_a":
      np.testing.assert_allclose(u16, u1, atol=1e-9)
    else:
      big = np.abs(u1) > 1e-4  # where Adam's eps does not matter
      assert big.mean() > 0.5
      np.testing.assert_allclose(u16[big] / u1[big], 16.0, rtol=1e-3)
  assert seen == {"lora_a", "lora_b", "magnitude"}


def test_loraplus_option_names(tmp_path):
  toml = tmp_path / "c.toml"
  toml.write_text("loraplus_lr_ratio = 16\n")
  assert load_config(["--config", str(toml)]).loraplus_lr_ratio == 16.0
  assert load_config(["--loraplus-lr-ratio", "4"]).loraplus_lr_ratio == 4.0
  assert "loraplus_lr_ratio" in make_config({}).resume_keys()
  with pytest.raises(ValueError, match="adapter method"):
    make_config({"method": "full", "loraplus_lr_ratio": 16})


def test_dora_on_tied_embedding_with_peft_export_is_refused_before_loading(tmp_path, monkeypatch, capsys):
  import train.setup
  from train.__main__ import main

  def no_load(*a, **k):
    raise AssertionError("the model was loaded before the refusal")

  monkeypatch.setattr(train.setup, "load_base_model", no_load)
  for export in ("peft", "both"):
    rc = main(["--model", "tiny-random", "--target-modules", "embed_tokens,q_proj", "--export", export,
               "--output-dir", str(tmp_path / "x"), "--progress=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "DoRA on an embedding that the model also uses as its LM head" in err and "--export merged" in err
  # LoRA on the tied embedding has a PEFT form (ensure_weight_tying); a regex reaching it counts too.
  train.setup.check_before_loading(make_config({"model": "tiny-random", "method": "lora", "export": "peft",
                                                "target_modules": ["embed_tokens"]}))
  with pytest.raises(ValueError, match="LM head"):
    train.setup.check_before_loading(make_config({"model": "tiny-random", "export": "both",
                                                  "lora": {"target_modules": ".*embed_tokens"}}))


def test_generation_task_reports_exact_match_and_prints_samples(tmp_path, capsys):
  """A prompt/response file: the evaluation prints sample generations and reports exact_match,
  equal to generating with the exported PEFT adapter (task_type CAUSAL_LM) independently."""
  import json
  from train.generate import exact_match, generate_texts, load_run
  from train.loop import run

  words = ["good", "bad", "great", "awful", "fine", "dull"]
  rows = [{"prompt": f"say {w} {i % 5}", "response": w} for i, w in enumerate(words * 5)]
  path = tmp_path / "pr.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = make_config(dict(model="tiny-random", task=str(path), steps=3, batch_size=8, seq_len=32, eval_size=6,
                         learning_rate=1e-2, warmup_steps=1, output_dir=str(tmp_path / "run"), progress=False,
                         rank=4, alpha=8.0, eval_batch_size=8, eval_generate=5, eval_samples=2,
                         export="peft", loraplus_lr_ratio=4.0))
  summary = run(cfg)
  after = summary["after"]
  assert "perplexity" in after and after["generated"] == 5 and len(after["samples"]) == 2
  assert 0.0 <= after["exact_match"] <= 1.0
  printed = capsys.readouterr().out
  assert printed.count("generated: ") == 4  # 2 samples, before and after
  assert "exact match" in printed
  peft_cfg = json.loads((tmp_path / "run" / "peft_adapter" / "adapter_config.json").read_text())
  assert peft_cfg["task_type"] == "CAUSAL_LM"
  gen = load_run(tmp_path / "run", source="peft")
  from train.data import load_task, split_examples
  _, eval_ex = split_examples(load_task(str(path)).examples, cfg.eval_size, cfg.seed)
  prompts, refs = [e.prompt for e in eval_ex[:5]], [e.response for e in eval_ex[:5]]
  texts, _ = generate_texts(gen, prompts, max_new_tokens=after_max_new(gen.tokenizer, refs))
  assert [s["generated"] for s in after["samples"]] == texts[:2]
  assert exact_match(texts, refs) == after["exact_match"]


def after_max_new(tokenizer, refs):
  return max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs) + 2
