"""The trainer end to end on a tiny random Llama: learning, resume, export, errors."""

import json

import jax
import numpy as np
import pytest
from _label_data import label_file
from safetensors.numpy import load_file

import dora_jax
from dora_jax.models import Llama, load_pretrained
from train.config import build_parser, load_config, make_config
from train.loop import run
from train.modeling import load_base_model


def _cfg(tmp_path, out="run", **kw):
  base = dict(model="tiny-random", task=str(label_file(tmp_path)), steps=8, batch_size=8,
              seq_len=32, eval_size=16, learning_rate=1e-2, warmup_steps=2, output_dir=str(tmp_path / out),
              progress=False, rank=4, alpha=8.0, save_every=2, eval_batch_size=16)
  base.update(kw)
  return make_config(base)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted DoRA run shared by the tests below."""
  tmp = tmp_path_factory.mktemp("trainer")
  cfg = _cfg(tmp, out="full", export="both")
  return tmp, cfg, run(cfg)


def test_dora_run_lowers_loss_and_writes_metrics(full_run):
  tmp, cfg, summary = full_run
  out = tmp / "full"
  recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == list(range(1, cfg.steps + 1))
  assert np.mean([r["loss"] for r in recs[-3:]]) < np.mean([r["loss"] for r in recs[:3]])
  saved = json.loads((out / "metrics.json").read_text())
  assert "accuracy" in saved["before"] and "accuracy" in saved["after"]
  assert saved["trainable_params"] == summary["trainable_params"] > 0
  assert (out / "loss.png").stat().st_size > 1000


def test_resume_gives_the_same_adapters_as_an_uninterrupted_run(full_run):
  tmp, _, _ = full_run
  part = _cfg(tmp, out="part", export="both", stop_after=3)
  assert run(part)["stopped_at"] == 3
  with pytest.raises(SystemExit, match="--resume"):  # never silently overwrite a run
    run(_cfg(tmp, out="part", export="both"))
  run(_cfg(tmp, out="part", export="both", resume=True))
  a = load_file(str(tmp / "full" / "peft_adapter" / "adapter_model.safetensors"))
  b = load_file(str(tmp / "part" / "peft_adapter" / "adapter_model.safetensors"))
  assert a.keys() == b.keys() and len(a) > 0
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
  la = [json.loads(l)["loss"] for l in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
  lb = [json.loads(l)["loss"] for l in (tmp / "part" / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  # A resume with other settings is refused, naming the field.
  with pytest.raises(ValueError, match="rank"):
    run(_cfg(tmp, out="part", resume=True, rank=2))


def test_export_merged_reloads_equal_to_adapted_model(full_run):
  tmp, cfg, _ = full_run
  out = tmp / "full"
  base = load_base_model(cfg)
  adapters, lcfg = dora_jax.import_peft(out / "peft_adapter", base.params)
  config, merged = load_pretrained(out / "merged")
  assert config == base.config
  model = Llama(config)
  ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
  want = dora_jax.wrap(model.apply, lcfg)({"params": base.params}, adapters, ids)
  got = model.apply({"params": merged}, ids)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(model.apply({"params": base.params}, ids), want, atol=1e-4)


@pytest.mark.parametrize("method", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_other_methods_run(tmp_path, method):
  summary = run(_cfg(tmp_path, method=method, steps=2, grad_accum=2, save_every=0, eval_size=8))
  assert np.isfinite(summary["final_loss"])


def test_text_task_reports_perplexity(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("\n\n".join(f"the film is good and the film is great {i}" for i in range(40)))
  summary = run(_cfg(tmp_path, task=str(path), steps=2, packing=True, eval_size=8, save_every=0))
  assert summary["after"]["perplexity"] > 1.0


def test_config_file_flags_and_errors(tmp_path):
  toml = tmp_path / "c.toml"
  toml.write_text('method = "lora"\nrank = 4\ntargets = ["q_proj", "v_proj"]\n')
  cfg = load_config(["--config", str(toml), "--rank", "2", "--rslora"])
  assert (cfg.method, cfg.rank, cfg.rslora, cfg.targets) == ("lora", 2, True, ("q_proj", "v_proj"))
  helptext = build_parser().format_help()
  for flag in ("--learning-rate", "--grad-accum", "--mesh", "--resume", "--packing"):
    assert flag in helptext
  with pytest.raises(ValueError, match="Unknown option"):
    make_config({"lerning_rate": 1.0})
  with pytest.raises(ValueError, match="multiple of grad_accum"):
    make_config({"batch_size": 6, "grad_accum": 4})
  with pytest.raises(ValueError, match="matches no module"):
    run(_cfg(tmp_path, targets=("nonexistent_proj",)))


def test_malformed_data_row_is_an_error_with_row_number(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "good film", "label": "positive"}\n{"text": "bad film"}\n')
  with pytest.raises(ValueError, match="row 2"):
    run(_cfg(tmp_path, task=str(path)))


def test_relative_output_dir_works_from_the_current_directory(tmp_path, monkeypatch):
  """The README's main job uses a relative output_dir; Orbax needs absolute paths."""
  cfg = _cfg(tmp_path, steps=2, save_every=1, export="peft")
  monkeypatch.chdir(tmp_path)
  cfg = make_config({**cfg.to_dict(), "output_dir": "runs/rel"})
  summary = run(cfg)
  out = tmp_path / "runs" / "rel"
  assert (out / "metrics.json").exists() and (out / "checkpoints" / "2").is_dir()
  assert summary["exported"]["peft"] == str(out / "peft_adapter")
  assert (out / "peft_adapter" / "adapter_model.safetensors").exists()


def test_save_and_load_adapters_accept_relative_paths(tmp_path, monkeypatch):
  params = {"fc": {"kernel": np.ones((4, 3), np.float32)}}
  config = dora_jax.LoraConfig(r=2, target_modules=["fc"], use_dora=True)
  adapters = dora_jax.init_adapters(jax.random.key(0), params, config)
  monkeypatch.chdir(tmp_path)
  dora_jax.save_adapters("adapters/a", adapters, config)
  loaded, loaded_config = dora_jax.load_adapters("adapters/a")
  assert loaded_config == config
  np.testing.assert_array_equal(loaded["fc"]["magnitude"], adapters["fc"]["magnitude"])


# ---------------------------------------------------------------------------
# VeRA / DVoRA


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_vera_and_dvora_learn_keep_projections_and_export_merged(tmp_path, method):
  from train.checkpoint import TrainCheckpointer
  from train.loop import lora_config, run_fingerprint
  cfg = _cfg(tmp_path, method=method, rank=0, steps=8, learning_rate=3e-2, export="merged",
             save_every=0, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
  assert cfg.rank == 256  # PEFT's VeraConfig default when no rank is given
  lcfg = lora_config(cfg)
  assert isinstance(lcfg, dora_jax.VeraConfig) and lcfg.use_dora == (method == "dvora")
  assert lcfg.d_initial == 0.1
  summary = run(cfg)
  out = tmp_path / "run"
  losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  # Trainable: the per-layer vectors (and magnitudes) only, not the shared projections.
  base = load_base_model(cfg)
  init = dora_jax.init_adapters(jax.random.key(0), base.params, lcfg)
  shared = init["shared"]
  n_vectors = dora_jax.count_params(init) - dora_jax.count_params(shared)
  assert summary["trainable_params"] == n_vectors
  from train.generate import _checkpoint_record
  step, record = _checkpoint_record(out / "checkpoints")
  assert record["config"] == run_fingerprint(cfg, record["config"]["data_sha256"])
  with TrainCheckpointer((out / "checkpoints").absolute(), record["config"], async_save=False) as ckpt:
    trained = ckpt.restore(step)["trainable"]
  for k in ("vera_A", "vera_B"):  # bitwise unchanged by training, and PEFT's seeded draw
    np.testing.assert_array_equal(np.asarray(trained["shared"][k]), np.asarray(shared[k]))
  lam_b = [np.asarray(a["vera_lambda_b"]) for a in jax.tree_util.tree_leaves(
      trained, is_leaf=lambda n: isinstance(n, dict) and "vera_lambda_b" in n) if isinstance(a, dict)]
  assert lam_b and any(np.abs(x).max() > 0 for x in lam_b)  # the vectors did train
  # The merged export reloads equal to the adapted model.
  config, merged = load_pretrained(out / "merged")
  model = Llama(config)
  ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
  want = dora_jax.wrap(model.apply, lcfg)({"params": base.params}, trained, ids)
  np.testing.assert_allclose(model.apply({"params": merged}, ids), want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(model.apply({"params": base.params}, ids), want, atol=1e-4)


@pytest.mark.parametrize("method,export,targets", [
    ("dvora", "peft", "q_proj,v_proj"), ("dvora", "both", "q_proj,v_proj"),
    ("vera", "peft", "embed_tokens,q_proj"), ("vera", "both", "embed_tokens,q_proj")])
def test_peft_export_without_a_peft_form_is_refused_before_training(tmp_path, method, export, targets,
                                                                    capsys):
  """DVoRA has no PEFT format; PEFT's VeRA adapts Linear layers only (not the embedding)."""
  from train.__main__ import main
  if method == "dvora":
    with pytest.raises(ValueError, match="--export merged"):
      _cfg(tmp_path, method=method, export=export)
  rc = main(["--model", "tiny-random", "--method", method, "--export", export,
             "--target-modules", targets, "--output-dir", str(tmp_path / "never")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
  assert "--export merged" in err
  assert not (tmp_path / "never").exists()  # refused before anything was loaded or written


def test_vera_run_exports_a_peft_adapter_that_loads_back_equal(tmp_path):
  """--method vera --export peft writes PEFT's VeRA folder; dora_jax.import_peft reads it back
  into adapters whose outputs equal the run's final checkpoint's."""
  from train.checkpoint import TrainCheckpointer
  from train.generate import _checkpoint_record
  from train.loop import lora_config
  cfg = _cfg(tmp_path, method="vera", rank=8, steps=3, learning_rate=3e-2, export="peft",
             save_every=0, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
  summary = run(cfg)
  out = tmp_path / "run"
  assert summary["exported"]["peft"] == str(out / "peft_adapter")
  peft_cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
  assert peft_cfg["peft_type"] == "VERA" and peft_cfg["r"] == 8 and peft_cfg["task_type"] == "CAUSAL_LM"
  tensors = load_file(str(out / "peft_adapter" / "adapter_model.safetensors"))
  assert {"base_model.vera_A", "base_model.vera_B"} <= set(tensors)
  assert any(k.endswith(".q_proj.vera_lambda_b") for k in tensors)
  base = load_base_model(cfg)
  adapters, lcfg = dora_jax.import_peft(out / "peft_adapter", base.params)
  assert isinstance(lcfg, dora_jax.VeraConfig) and not lcfg.use_dora
  step, record = _checkpoint_record(out / "checkpoints")
  with TrainCheckpointer((out / "checkpoints").absolute(), record["config"], async_save=False) as ckpt:
    trained = ckpt.restore(step)["trainable"]
  model = Llama(base.config)
  ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, base.config.vocab_size, (2, 9)))
  want = dora_jax.wrap(model.apply, lora_config(cfg))({"params": base.params}, trained, ids)
  got = dora_jax.wrap(model.apply, lcfg)({"params": base.params}, adapters, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(model.apply({"params": base.params}, ids), want, atol=1e-4)  # it trained


def test_offload_optimizer_trains_and_resumes_like_device_state(full_run, tmp_path):
  """--offload-optimizer: Adam's state lives in pinned host memory, and the adapters equal the
  uninterrupted run's with the state on the device, also across a stop and --resume."""
  tmp, _, summary = full_run
  if not dora_jax.sharding.supports_host_offload():
    with pytest.raises(SystemExit, match="pinned_host"):
      run(_cfg(tmp_path, out="off", offload_optimizer=True))
    return
  assert run(_cfg(tmp, out="off", export="both", offload_optimizer=True, stop_after=3))["stopped_at"] == 3
  off = run(_cfg(tmp, out="off", export="both", offload_optimizer=True, resume=True))
  assert off["optimizer_state_memory"] == ["pinned_host"]
  assert summary["optimizer_state_memory"] == ["device"]
  a = load_file(str(tmp / "full" / "peft_adapter" / "adapter_model.safetensors"))
  b = load_file(str(tmp / "off" / "peft_adapter" / "adapter_model.safetensors"))
  assert a.keys() == b.keys() and len(a) > 0
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
