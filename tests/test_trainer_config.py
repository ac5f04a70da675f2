"""The trainer's options: PEFT's field names ([lora]/[vera] tables, flags), the old aliases,
resume keys marked at their declaration, flags with underscores, --help with defaults."""

import dataclasses

import pytest

from train.config import TrainConfig, build_parser, load_config, make_config
from train.loop import lora_config, run_fingerprint

NAMES = ["q_proj", "v_proj"]


def _write(tmp_path, text):
  path = tmp_path / "c.toml"
  path.write_text(text)
  return str(path)


def test_lora_table_with_peft_names_equals_the_old_keys(tmp_path):
  new = load_config(["--config", _write(tmp_path, 'model = "tiny-random"\n[lora]\nr = 4\nlora_alpha = 8.0\n'
                                        'target_modules = ["q_proj", "v_proj"]\nlora_dropout = 0.1\n'
                                        'use_rslora = true\nuse_dora = false\n')])
  old = make_config(dict(model="tiny-random", rank=4, alpha=8.0, targets=NAMES, dropout=0.1, rslora=True,
                         method="lora"))
  assert new == old
  lcfg = lora_config(new)
  assert (lcfg.r, lcfg.lora_alpha, lcfg.target_modules, lcfg.lora_dropout, lcfg.use_rslora,
          lcfg.use_dora) == (4, 8.0, ("q_proj", "v_proj"), 0.1, True, False)


def test_target_modules_string_is_a_regex_and_a_list_is_names(tmp_path):
  regex = load_config(["--config", _write(tmp_path, '[lora]\ntarget_modules = ".*(q|v)_proj"\n')])
  assert lora_config(regex).target_modules == ".*(q|v)_proj"
  # A single name in a list stays a name, whatever its characters (nothing is guessed).
  one = make_config({"lora": {"target_modules": ["q_proj"]}})
  assert lora_config(one).target_modules == ("q_proj",)
  # Flags: comma separated names, 'all-linear', or re:PATTERN.
  assert load_config(["--target-modules", "q_proj,v_proj"]).targets == ("q_proj", "v_proj")
  assert load_config(["--target-modules", "re:.*proj"]).targets == ".*proj"
  assert load_config(["--target-modules", "all-linear"]).targets == "all-linear"
  # The old `targets` alias keeps its old reading.
  assert make_config({"targets": "q_proj,v_proj"}).targets == ("q_proj", "v_proj")
  assert make_config({"targets": ".*proj"}).targets == ".*proj"
  with pytest.raises(ValueError, match="not a valid regex"):
    make_config({"lora": {"target_modules": "(q_proj"}})


def test_vera_table_and_peft_flags(tmp_path):
  cfg = load_config(["--config", _write(tmp_path, '[vera]\nr = 32\nd_initial = 0.2\nprojection_prng_key = 7\n'
                                        'vera_dropout = 0.05\ntarget_modules = ["q_proj"]\nuse_dora = true\n')])
  v = lora_config(cfg)
  assert cfg.method == "dvora" and (v.r, v.d_initial, v.projection_prng_key, v.vera_dropout, v.use_dora) == (
      32, 0.2, 7, 0.05, True)
  flags = load_config(["--r", "2", "--lora-alpha", "3", "--lora_dropout", "0.2", "--use-rslora",
                       "--learning_rate=0.5"])
  assert (flags.rank, flags.alpha, flags.dropout, flags.rslora, flags.learning_rate) == (2, 3.0, 0.2, True, 0.5)
  assert load_config(["--rank", "5", "--alpha", "6"]).rank == 5  # the old flags are aliases
  assert load_config(["--method", "vera"]).rank == 256  # PEFT's VeraConfig.r when none is given


@pytest.mark.parametrize("data,match", [
    ({"lora": {"lora_alph": 2}}, "lora_alpha"),
    ({"rank": 2, "lora": {"r": 3}}, "same option"),
    ({"method": "lora", "lora": {"use_dora": True}}, "use_dora"),
    ({"lora": {"r": 2}, "vera": {"r": 2}}, r"\[lora\] and a \[vera\]"),
])
def test_config_table_errors_name_the_problem(data, match):
  with pytest.raises(ValueError, match=match):
    make_config(data)


def test_run_fingerprint_is_built_from_the_resume_key_marks():
  marked = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume_key")}
  cfg = make_config({"model": "tiny-random"})
  assert set(run_fingerprint(cfg)) == marked
  # What a resumed run must share, and what it may change.
  assert {"model", "method", "quantize", "targets", "rank", "alpha", "dropout", "rslora", "d_initial",
          "projection_prng_key", "seq_len", "steps", "learning_rate", "seed"} <= marked
  assert not {"output_dir", "resume", "overwrite", "export", "progress", "eval_every", "stop_after",
              "save_every", "tensorboard"} & marked


def test_help_shows_defaults_and_peft_names():
  text = build_parser().format_help()
  for s in ("--lora-alpha", "--target-modules", "--r R", "(default: 200)", "(default: 0.001)"):
    assert s in text, s


def test_boolean_flags_take_a_value_or_a_no_prefix(tmp_path):
  toml = _write(tmp_path, "progress = true\nscan_layers = true\n[lora]\nuse_rslora = true\n")
  cfg = load_config(["--config", toml, "--no-progress", "--no_scan_layers", "--no-use-rslora"])
  assert (cfg.progress, cfg.scan_layers, cfg.rslora) == (False, False, False)
  assert load_config(["--config", toml]).progress is True
  assert load_config(["--no-progress", "--progress"]).progress is True  # the last one wins
  assert load_config(["--progress", "false"]).progress is False
  assert load_config(["--no-rslora"]).rslora is False


def test_eval_size_is_a_fraction_or_a_count():
  assert make_config({}).eval_size == 0.1
  assert load_config(["--eval-size", "200"]).eval_size == 200
  assert isinstance(load_config(["--eval_size", "200"]).eval_size, int)
  assert load_config(["--eval-size", "0.25"]).eval_size == 0.25
  for bad in (0, 1.5, -3):
    with pytest.raises(ValueError, match="fraction"):
      make_config({"eval_size": bad})


def test_split_report_says_how_rows_became_train_and_eval():
  from train import data as data_lib
  from train.loop import split_report
  examples = [data_lib.Example(f"t{i % 8}", "ab"[i % 8 % 2], i % 8 % 2) for i in range(10)]
  train_ex, eval_ex = data_lib.split_examples(examples, 0.25, 0)
  assert (len(eval_ex), len(train_ex)) == (2, 6) or len(train_ex) + len(eval_ex) <= 10
  line = split_report(examples, 0.25, len(eval_ex), len(train_ex), 0)
  assert "10 examples, 8 distinct (2 exact duplicates count once)" in line
  assert f"-> {len(eval_ex)} " in line and f"the other {len(train_ex)}" in line
  left = 10 - len(eval_ex) - len(train_ex)
  assert (f"{left} copies of eval examples left out" in line) == (left > 0)


def test_peft_export_names_a_loadable_base(tmp_path):
  from train.loop import base_model_path
  assert base_model_path(str(tmp_path)) == str(tmp_path.absolute())
  assert base_model_path("tiny-random") == "tiny-random"


def test_main_prints_one_line_errors(capsys):
  from train.__main__ import main
  assert main(["--eval-size", "1.5"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: eval_size") and err.count("\n") == 1
