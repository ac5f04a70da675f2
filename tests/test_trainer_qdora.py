"""The trainer on a quantized base (QLoRA / QDoRA) and with cached base norms, on the tiny random Llama."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import dora_jax
from dora_jax.models import Llama, load_pretrained
from train import steps as steps_lib
from train.loop import lora_config, run
from train.modeling import load_base_model
from tests.test_trainer import _cfg


def _losses(out):
  return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_qdora_run_learns_resumes_and_exports(tmp_path):
  kw = dict(quantize="nf4", steps=6, save_every=2, export="both")
  summary = run(_cfg(tmp_path, out="full", **kw))
  full = tmp_path / "full"
  losses = _losses(full)
  assert np.mean(losses[-2:]) < np.mean(losses[:2])
  # Stopped after 3 steps and resumed: the same losses and adapters as the uninterrupted run.
  assert run(_cfg(tmp_path, out="part", stop_after=3, **kw))["stopped_at"] == 3
  run(_cfg(tmp_path, out="part", resume=True, **kw))
  np.testing.assert_allclose(_losses(tmp_path / "part"), losses, rtol=1e-6)
  a = load_file(str(full / "peft_adapter" / "adapter_model.safetensors"))
  b = load_file(str(tmp_path / "part" / "peft_adapter" / "adapter_model.safetensors"))
  assert a.keys() == b.keys() and len(a) > 0
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
  # The model it trained: the adapters on the NF4 base (independent: quantized here again).
  cfg = _cfg(tmp_path, out="full", **kw)
  base = load_base_model(cfg)
  model = Llama(base.config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, base.config.vocab_size, (2, 9)))
  layouts = dora_jax.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
  qparams = dora_jax.quantize(base.params, method="nf4", layouts=layouts)
  deq = dora_jax.dequantize_params(qparams)
  adapters, lcfg = dora_jax.import_peft(full / "peft_adapter", deq)  # applies to the dequantized base
  assert lcfg == lora_config(cfg)
  want = dora_jax.wrap(model.apply, lcfg)({"params": qparams}, adapters, ids)
  np.testing.assert_allclose(dora_jax.wrap(model.apply, lcfg)({"params": deq}, adapters, ids), want,
                             rtol=1e-5, atol=1e-5)
  # The merged export is full precision and runs the adapted model.
  config, merged = load_pretrained(full / "merged")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(merged))
  np.testing.assert_allclose(model.apply({"params": merged}, ids), want, rtol=1e-4, atol=1e-4)
  assert summary["trainable_params"] > 0


def test_quantize_needs_an_adapter_method(tmp_path):
  with pytest.raises(ValueError, match="adapter method"):
    _cfg(tmp_path, method="full", quantize="int8")


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_first_dora_step_loss_equals_the_base_models_bitwise(tmp_path, quantize):
  """Cached ||W0||²_c (dora_jax.linen.base_norms): g = m / ||W0||_c is exactly 1 at init, so
  the first DoRA step's loss is the base model's loss, bit for bit."""
  from train.loop import cached_base_norms
  cfg = _cfg(tmp_path, method="dora", quantize=quantize)
  base = load_base_model(cfg)
  model = Llama(base.config)
  params = base.params
  if quantize != "none":
    params = dora_jax.quantize(params, method=quantize,
                               layouts=dora_jax.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32)))
  lcfg = lora_config(cfg)
  adapters = dora_jax.init_adapters(jax.random.key(0), params, lcfg)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  p_sh = jax.tree.map(lambda _: dora_jax.sharding.replicated(mesh), base.params)
  a_sh = dora_jax.sharding.adapter_shardings(adapters, params, p_sh, mesh)
  norms, _ = cached_base_norms(params, adapters, a_sh)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, base.config.vocab_size, (4, 16)).astype(np.int32)
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "attention_mask": np.ones_like(ids),
           "loss_mask": (rng.random(ids.shape) < 0.5).astype(np.int32)}
  tx, _ = steps_lib.make_optimizer(learning_rate=1e-2, steps=4, warmup_steps=0, min_lr_ratio=0.1,
                                   weight_decay=0.0, grad_clip=1.0, method="dora")
  step = steps_lib.make_train_step(steps_lib.make_forward(model, "dora", lcfg), tx)
  frozen = steps_lib.frozen_inputs(params, norms)
  fresh = lambda: jax.tree.map(jnp.copy, adapters)  # the step donates its adapters
  _, _, m = step(frozen, fresh(), tx.init(adapters), batch, jax.random.key(0))
  # The reference: the base model alone (the full fine-tuning step on the same weights).
  base_w = jax.tree.map(jnp.copy, dora_jax.dequantize_params(params))  # the full step donates it
  tx_full, _ = steps_lib.make_optimizer(learning_rate=1e-2, steps=4, warmup_steps=0, min_lr_ratio=0.1,
                                        weight_decay=0.0, grad_clip=1.0, method="full")
  full_step = steps_lib.make_train_step(steps_lib.make_forward(model, "full"), tx_full)
  _, _, m_base = full_step({}, base_w, tx_full.init(base_w), batch, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(m["loss"]), np.asarray(m_base["loss"]))
  # The cached norms are what the step uses: other norms give another loss.
  wrong = steps_lib.frozen_inputs(params, jax.tree.map(lambda n: 4.0 * n, norms))
  _, _, m_wrong = step(wrong, fresh(), tx.init(adapters), batch, jax.random.key(0))
  assert abs(float(m_wrong["loss"]) - float(m["loss"])) > 1e-3
