"""The weight-decomposition analysis (DoRA paper §3, Fig. 2) against numpy formulas."""

import jax
import numpy as np
import pytest

import dora_jax
from dora_jax import analysis

RNG = np.random.default_rng(0)
I, O, L = 6, 5, 3


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def np_shift(w0, wt):
  """ΔM = mean_n |‖Wt[:, n]‖ − ‖W0[:, n]‖|, ΔD = mean_n (1 − cos(Wt[:, n], W0[:, n])), float64."""
  w0, wt = np.asarray(w0, np.float64), np.asarray(wt, np.float64)
  m0, mt = np.linalg.norm(w0, axis=0), np.linalg.norm(wt, axis=0)
  cos = np.einsum("io,io->o", w0, wt) / (m0 * mt)
  return np.mean(np.abs(mt - m0)), np.mean(1.0 - cos)


def _params():
  return {"layers_0": {"q_proj": {"kernel": rand(I, O)}, "v_proj": {"kernel": rand(I, O)}},
          "layers_1": {"q_proj": {"kernel": rand(I, O)}, "v_proj": {"kernel": rand(I, O)}},
          "lm_head": {"kernel": rand(I, 7)}}


def _trained_adapters(params, config, layouts=None):
  adapters = dora_jax.init_adapters(jax.random.key(0), params, config, layouts=layouts)
  flat = dora_jax.tree.flatten_adapters(adapters)
  for ad in flat.values():  # a trained state: B != 0, magnitude moved off ||W0||_c
    ad["lora_b"] = np.asarray(rand(*ad["lora_b"].shape)) * 0.3
    if "magnitude" in ad:
      ad["magnitude"] = np.asarray(ad["magnitude"]) * (1 + 0.2 * rand(*ad["magnitude"].shape))
  return dora_jax.tree.unflatten(flat)


def test_full_finetuning_matches_numpy_and_picks_modules():
  base = _params()
  tuned = jax.tree.map(lambda w: w + 0.3 * rand(*w.shape), base)
  recs = dora_jax.weight_decomposition(base, tuned_params=tuned, modules=["q_proj"])
  assert [(r["module"], r["layer"]) for r in recs] == [("layers_0/q_proj", 0), ("layers_1/q_proj", 1)]
  for r in recs:
    layer = r["module"].split("/")[0]
    dm, dd = np_shift(base[layer]["q_proj"]["kernel"], tuned[layer]["q_proj"]["kernel"])
    np.testing.assert_allclose([r["delta_m"], r["delta_d"]], [dm, dd], rtol=1e-4)
    assert r["delta_m"] > 0 and r["delta_d"] > 0
  every = dora_jax.weight_decomposition(base, tuned_params=tuned)  # all-linear: lm_head left out
  assert [r["module"] for r in every] == [
      "layers_0/q_proj", "layers_0/v_proj", "layers_1/q_proj", "layers_1/v_proj"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_are_merged_then_decomposed(use_dora):
  base = _params()
  config = dora_jax.LoraConfig(r=2, lora_alpha=4.0, target_modules=["q_proj", "v_proj"],
                               use_dora=use_dora)
  adapters = _trained_adapters(base, config)
  recs = dora_jax.weight_decomposition(base, adapters=adapters, config=config, modules=["v_proj"])
  assert [r["module"] for r in recs] == ["layers_0/v_proj", "layers_1/v_proj"]
  for r in recs:
    layer = r["module"].split("/")[0]
    ad = adapters[layer]["v_proj"]
    w0 = np.asarray(base[layer]["v_proj"]["kernel"], np.float64)
    v = w0 + 2.0 * np.asarray(ad["lora_a"], np.float64) @ np.asarray(ad["lora_b"], np.float64)
    wt = v * (np.asarray(ad["magnitude"]) / np.linalg.norm(v, axis=0)) if use_dora else v
    np.testing.assert_allclose([r["delta_m"], r["delta_d"]], np_shift(w0, wt), rtol=1e-4, atol=1e-7)
  if use_dora:  # ΔM of DoRA is the magnitude's move: mean |m − ||W0||_c|
    w0 = np.asarray(base["layers_0"]["v_proj"]["kernel"], np.float64)
    want = np.mean(np.abs(np.asarray(adapters["layers_0"]["v_proj"]["magnitude"]) - np.linalg.norm(w0, axis=0)))
    np.testing.assert_allclose(recs[0]["delta_m"], want, rtol=1e-4)


def test_vera_adapters_any_method():
  base = _params()
  config = dora_jax.VeraConfig(r=4, target_modules=["q_proj"])
  adapters = dora_jax.init_adapters(jax.random.key(1), base, config)
  flat = dora_jax.tree.flatten_adapters(adapters)
  for ad in flat.values():
    ad["vera_lambda_b"] = np.asarray(rand(*ad["vera_lambda_b"].shape))
  adapters = {**dora_jax.tree.unflatten(flat), "shared": adapters["shared"]}
  recs = dora_jax.weight_decomposition(base, adapters=adapters, config=config)
  merged = dora_jax.merge(base, adapters, config)
  for r in recs:
    layer = r["module"].split("/")[0]
    want = np_shift(base[layer]["q_proj"]["kernel"], merged[layer]["q_proj"]["kernel"])
    np.testing.assert_allclose([r["delta_m"], r["delta_d"]], want, rtol=1e-4)
    assert r["delta_d"] > 0


def test_unchanged_kernel_gives_zero():
  base = _params()
  recs = dora_jax.weight_decomposition(base, tuned_params=base)
  assert recs and all(abs(r["delta_m"]) < 1e-6 and abs(r["delta_d"]) < 1e-6 for r in recs)
  config = dora_jax.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
  fresh = dora_jax.init_adapters(jax.random.key(0), base, config)  # B = 0: the base model
  recs = dora_jax.weight_decomposition(base, adapters=fresh, config=config)
  assert all(abs(r["delta_m"]) < 1e-5 and abs(r["delta_d"]) < 1e-6 for r in recs)


def test_scale_invariance_and_pure_magnitude_change():
  w0 = rand(I, O)
  scale = np.exp(rand(O)).astype(np.float32)  # positive per-column factors
  dm, dd = analysis.kernel_shift(w0, w0 * scale)
  assert abs(float(dd)) < 1e-6  # only the magnitude moved: no direction change
  np.testing.assert_allclose(dm, np.mean(np.abs(scale - 1) * np.linalg.norm(w0, axis=0)), rtol=1e-5)
  w_small = w0 + 1e-4 * rand(I, O)  # ΔD ~ 1e-8: 1 − cos in float32 would give noise
  np.testing.assert_allclose(analysis.kernel_shift(w0, w_small)[1], np_shift(w0, w_small)[1], rtol=1e-2)
  wt = w0 + 0.5 * rand(I, O)
  _, dd1 = analysis.kernel_shift(w0, wt)
  _, dd2 = analysis.kernel_shift(w0, wt * scale)  # ΔD is blind to column scale
  np.testing.assert_allclose(dd1, dd2, rtol=1e-5)
  assert dd1 > 1e-3
  with pytest.raises(ValueError, match="same layer"):
    analysis.kernel_shift(w0, w0[:, :3])


def test_stacked_kernels_per_layer():
  base = {"layers": {"q_proj": {"kernel": rand(L, I, O)}}}
  tuned = {"layers": {"q_proj": {"kernel": base["layers"]["q_proj"]["kernel"] + 0.2 * rand(L, I, O)}}}
  layouts = {"layers/q_proj": dora_jax.KernelLayout(stack=1)}
  recs = dora_jax.weight_decomposition(base, tuned_params=tuned, layouts=layouts)
  assert [r["layer"] for r in recs] == list(range(L))
  for r in recs:
    want = np_shift(base["layers"]["q_proj"]["kernel"][r["layer"]], tuned["layers"]["q_proj"]["kernel"][r["layer"]])
    np.testing.assert_allclose([r["delta_m"], r["delta_d"]], want, rtol=1e-4)
  with pytest.raises(ValueError, match="kernel_layouts"):  # a 3-D kernel needs its layout
    dora_jax.weight_decomposition(base, tuned_params=tuned, modules=["q_proj"])
  config = dora_jax.LoraConfig(r=2, target_modules=["q_proj"])
  adapters = _trained_adapters(base, config, layouts=layouts)  # adapters carry the layout
  recs = dora_jax.weight_decomposition(base, adapters=adapters, config=config)
  ad = adapters["layers"]["q_proj"]
  for r in recs:
    i = r["layer"]
    w0 = base["layers"]["q_proj"]["kernel"][i]
    wt = w0 + (8.0 / 2) * np.asarray(ad["lora_a"][i]) @ np.asarray(ad["lora_b"][i])
    np.testing.assert_allclose([r["delta_m"], r["delta_d"]], np_shift(w0, wt), rtol=1e-4)


def test_bad_input_is_named():
  base = _params()
  with pytest.raises(ValueError, match="either adapters"):
    dora_jax.weight_decomposition(base)
  with pytest.raises(ValueError, match="'k_proj' matches none"):
    dora_jax.weight_decomposition(base, tuned_params=base, modules=["k_proj"])
  config = dora_jax.LoraConfig(r=2, target_modules=["q_proj"])
  adapters = dora_jax.init_adapters(jax.random.key(0), base, config)
  with pytest.raises(ValueError, match="'v_proj' matches none of the adapted"):
    dora_jax.weight_decomposition(base, adapters=adapters, config=config, modules=["v_proj"])


def test_slope_and_plot_writes_png(tmp_path):
  x = np.linspace(0.01, 0.1, 8)
  up = [{"module": f"layers_{i % 2}/q_proj", "layer": i % 2, "step": 10 * (i // 2),
         "delta_d": float(d), "delta_m": float(2 * d + 0.1)} for i, d in enumerate(x)]
  down = [{**r, "delta_m": float(-3 * r["delta_d"] + 1)} for r in up]
  down += [{**r, "module": "layers_0/v_proj"} for r in down]
  assert dora_jax.decomposition_slope(up) == pytest.approx(2.0)
  assert np.isnan(dora_jax.decomposition_slope(up[:1]))
  # Two steps, each with slope −1 across layers, whose means rise together: pooled > 0, within −1.
  grow = [{"step": s, "delta_d": s + d, "delta_m": 10 * s - d} for s in (1, 2) for d in (0.0, 0.1, 0.2)]
  assert dora_jax.decomposition_slope(grow) > 0
  assert dora_jax.decomposition_slope(grow, within_step=True) == pytest.approx(-1.0)
  out = tmp_path / "fig" / "decomposition.png"
  slopes = dora_jax.plot_decomposition({"LoRA": up, "DoRA": down}, out, modules=["q_proj", "v_proj"])
  assert out.stat().st_size > 1000
  assert slopes["LoRA"]["q_proj"] == pytest.approx(2.0)
  assert slopes["DoRA"]["q_proj"] == pytest.approx(-3.0)
  assert np.isnan(slopes["LoRA"]["v_proj"])
  with pytest.raises(ValueError, match="no record is for module 'o_proj'"):
    dora_jax.plot_decomposition({"LoRA": up}, out, modules=["o_proj"])
