"""VeRA and DVoRA against an independent numpy reference of PEFT's VeRA forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from dora_jax import nnx as dn

RNG = np.random.default_rng(3)


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def np_vera(x, w0, bias, vera_a, vera_b, lam_d, lam_b, m=None, norm=None):
  """PEFT ``tuners/vera/layer.py`` Linear.forward (no dropout) in float64, our [I, O] layout;
  DVoRA: DoRA's rescaling (paper eq. 5) of W0 + ΔW_VeRA with the norm over the inputs."""
  x, w0, vera_a, vera_b = (np.asarray(t, np.float64) for t in (x, w0, vera_a, vera_b))
  i_dim, o_dim = w0.shape
  a, b = vera_a[:i_dim], vera_b[:, :o_dim]
  lam_d, lam_b = np.asarray(lam_d, np.float64), np.asarray(lam_b, np.float64)
  bias = 0.0 if bias is None else np.asarray(bias, np.float64)
  delta = (a * lam_d) @ b * lam_b  # A diag(λd) B diag(λb)
  if m is None:
    return x @ w0 + bias + ((x @ a) * lam_d) @ b * lam_b
  v = w0 + delta
  norm = np.sqrt((v ** 2).sum(0)) if norm is None else norm  # held fixed: the paper's detach
  return x @ (v * (np.asarray(m, np.float64) / norm)) + bias


def np_vera_norm(w0, vera_a, vera_b, lam_d, lam_b):
  i_dim, o_dim = w0.shape
  a, b = np.asarray(vera_a, np.float64)[:i_dim], np.asarray(vera_b, np.float64)[:, :o_dim]
  v = np.asarray(w0, np.float64) + (a * np.asarray(lam_d, np.float64)) @ b * np.asarray(lam_b, np.float64)
  return np.sqrt((v ** 2).sum(0))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="up")(x)
    return nn.Dense(3, name="down")(jnp.tanh(h))


def setup(use_dora, r=4):
  model, x = Net(), jnp.asarray(rand(5, 4))
  params = model.init(jax.random.key(0), x)["params"]
  cfg = dora_jax.VeraConfig(r=r, target_modules=["up", "down"], use_dora=use_dora, projection_prng_key=7)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  for k in ("up", "down"):  # move off the init so every term is exercised
    o = ad[k]["vera_lambda_b"].shape[0]
    ad[k]["vera_lambda_b"] = jnp.asarray(rand(o))
    ad[k]["vera_lambda_d"] = jnp.asarray(rand(r))
    if use_dora:
      ad[k]["magnitude"] = ad[k]["magnitude"] * (1 + 0.3 * jnp.asarray(rand(o)))
  return model, x, params, cfg, ad


def reference(model, x, params, ad, up_norm=None):
  sh = ad["shared"]
  up, down = params["up"], params["down"]
  h = np_vera(x, up["kernel"], up["bias"], sh["vera_A"], sh["vera_B"], ad["up"]["vera_lambda_d"],
              ad["up"]["vera_lambda_b"], ad["up"].get("magnitude"), up_norm)
  return np_vera(np.tanh(h), down["kernel"], down["bias"], sh["vera_A"], sh["vera_B"],
                 ad["down"]["vera_lambda_d"], ad["down"]["vera_lambda_b"], ad["down"].get("magnitude"))


def test_shapes_init_and_projections():
  model, x, params, cfg, _ = setup(False)
  ad = dora_jax.init_adapters(jax.random.key(1), params, cfg)
  assert ad["shared"]["vera_A"].shape == (6, 4) and ad["shared"]["vera_B"].shape == (4, 6)
  np.testing.assert_array_equal(ad["up"]["vera_lambda_d"], np.full(4, 0.1, np.float32))
  np.testing.assert_array_equal(ad["down"]["vera_lambda_b"], np.zeros(3, np.float32))
  bound = 1 / np.sqrt(6)
  assert np.abs(ad["shared"]["vera_A"]).max() <= bound
  # same seed, same projections; another seed, others
  again = dora_jax.init_adapters(jax.random.key(9), params, cfg)
  np.testing.assert_array_equal(again["shared"]["vera_A"], ad["shared"]["vera_A"])
  y = dora_jax.wrap(model.apply, cfg)(params, ad, x)
  np.testing.assert_allclose(y, model.apply({"params": params}, x), atol=1e-6)
  assert dora_jax.count_params({k: v for k, v in ad.items() if k != "shared"}) == 2 * 4 + 6 + 3


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("path", ["custom_vjp", "factored", "merged"])
def test_forward_and_merge_match_numpy(use_dora, path):
  model, x, params, cfg, ad = setup(use_dora)
  want = reference(model, x, params, ad)
  got = dora_jax.wrap(model.apply, cfg, dora_path=path)(params, ad, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  merged = dora_jax.merge(params, ad, cfg)
  np.testing.assert_allclose(model.apply({"params": merged}, x), want, rtol=1e-5, atol=1e-5)
  merged, norms = dora_jax.merge(params, ad, cfg, return_norms=True)
  back = dora_jax.unmerge(merged, ad, cfg, norms)
  np.testing.assert_allclose(back["up"]["kernel"], params["up"]["kernel"], atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gradients_match_finite_differences_and_projections_stay_frozen(use_dora):
  model, x, params, cfg, ad = setup(use_dora)
  apply = dora_jax.wrap(model.apply, cfg)
  loss = lambda a: jnp.sum(jnp.sin(apply(params, a, x)))
  grads = jax.grad(loss)(ad)
  assert not np.any(np.asarray(grads["shared"]["vera_A"]))  # frozen: no gradient
  sh = ad["shared"]
  up_norm = np_vera_norm(params["up"]["kernel"], sh["vera_A"], sh["vera_B"], ad["up"]["vera_lambda_d"],
                         ad["up"]["vera_lambda_b"])
  ref = lambda lam: np.sum(np.sin(reference(
      model, x, params, {**ad, "up": {**ad["up"], "vera_lambda_d": lam}}, up_norm)))
  lam = np.asarray(ad["up"]["vera_lambda_d"], np.float64)
  eps = 1e-5
  fd = np.array([(ref(lam + eps * e) - ref(lam - eps * e)) / (2 * eps) for e in np.eye(len(lam))])
  np.testing.assert_allclose(grads["up"]["vera_lambda_d"], fd, rtol=2e-3, atol=2e-4)
  # a few optimizer steps: vectors move, projections bitwise unchanged
  tx = dora_jax.freeze_base(optax.adam(1e-2))
  state = tx.init(ad)
  updates, state = tx.update(grads, state, ad)
  new = optax.apply_updates(ad, updates)
  np.testing.assert_array_equal(new["shared"]["vera_A"], ad["shared"]["vera_A"])
  assert not np.allclose(new["up"]["vera_lambda_b"], ad["up"]["vera_lambda_b"])


def test_nnx_equals_linen_and_shares_projections():
  class NNet(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(4, 6, rngs=rngs)
      self.down = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.down(jnp.tanh(self.up(x)))

  model = NNet(nnx.Rngs(0))
  x = jnp.asarray(rand(5, 4))
  cfg = dora_jax.VeraConfig(r=4, target_modules=["up", "down"], use_dora=True)
  params = dn.param_dict(model)
  dn.apply_adapters(model, cfg, nnx.Rngs(1))
  assert model.up.vera_A is model.down.vera_A  # one shared variable
  ad = dn.adapter_dict(model)
  for k in ("up", "down"):
    model_leaf = getattr(model, k).vera_lambda_b
    model_leaf[...] = jnp.asarray(rand(*model_leaf.shape))
  ad = dn.adapter_dict(model)
  want = reference(None, x, params, ad)
  np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
  assert {p for p, _ in nnx.to_flat_state(nnx.state(model, dn.Adapter))} == {
      (k, n) for k in ("up", "down") for n in ("vera_lambda_b", "vera_lambda_d", "magnitude")}


def test_bad_input():
  with pytest.raises(ValueError, match="fan_in_fan_out"):
    dora_jax.VeraConfig(target_modules=["up"], fan_in_fan_out=True)
  model, x, params, cfg, ad = setup(False)
  small = {**ad, "shared": {"vera_A": ad["shared"]["vera_A"][:3], "vera_B": ad["shared"]["vera_B"]}}
  with pytest.raises(ValueError, match="smaller than a layer"):
    dora_jax.wrap(model.apply, cfg)(params, small, x)
  with pytest.raises(ValueError, match="VeraConfig|vera"):
    dora_jax.wrap(model.apply, dora_jax.LoraConfig(r=2, target_modules=["up", "down"]))(params, ad, x)
  # PEFT allows a rank above the layer sizes (shared projections): so do we
  big = dora_jax.VeraConfig(r=16, target_modules=["up", "down"])
  ad16 = dora_jax.init_adapters(jax.random.key(0), params, big)
  assert ad16["shared"]["vera_A"].shape == (6, 16)


def test_save_load_and_peft_export_refusal(tmp_path):
  model, x, params, cfg, ad = setup(True)
  dora_jax.save_adapters(tmp_path / "a", ad, cfg)
  loaded, loaded_cfg = dora_jax.load_adapters(tmp_path / "a")
  assert loaded_cfg == cfg
  np.testing.assert_array_equal(loaded["shared"]["vera_B"], ad["shared"]["vera_B"])
  np.testing.assert_allclose(dora_jax.wrap(model.apply, loaded_cfg)(params, loaded, x),
                             dora_jax.wrap(model.apply, cfg)(params, ad, x), rtol=1e-6)
  with pytest.raises(ValueError, match="DVoRA.*merged"):
    dora_jax.export_peft(tmp_path / "p", ad, cfg)


def _saved_tree(path):
  """The tree of arrays in an adapter directory's Orbax checkpoint, from its metadata (what
  the files hold; directory byte counts depend on how Orbax packs them and were flaky)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path / "adapters")
  return getattr(getattr(meta, "item_metadata", meta), "tree", meta)


def test_save_projection_false_leaves_projections_out_and_redraws_them(tmp_path):
  """PEFT's save_projection=False: the files hold no vera_A/vera_B; load re-draws them from
  projection_prng_key, bit for bit; projections that are not that draw are refused, not lost."""
  import dataclasses

  model, x, params, cfg, ad = setup(True, r=64)
  lean = dataclasses.replace(cfg, save_projection=False)
  dora_jax.save_adapters(tmp_path / "full", ad, cfg)
  dora_jax.save_adapters(tmp_path / "lean", ad, lean)
  assert "shared" in _saved_tree(tmp_path / "full") and "shared" not in _saved_tree(tmp_path / "lean")
  loaded, loaded_cfg = dora_jax.load_adapters(tmp_path / "lean", lean)
  assert loaded_cfg == lean
  for k in ("vera_A", "vera_B"):
    np.testing.assert_array_equal(loaded["shared"][k], ad["shared"][k])
    assert loaded["shared"][k].dtype == ad["shared"][k].dtype
  np.testing.assert_array_equal(dora_jax.wrap(model.apply, lean)(params, loaded, x),
                                dora_jax.wrap(model.apply, cfg)(params, ad, x))
  moved = {**ad, "shared": {**ad["shared"], "vera_A": ad["shared"]["vera_A"].at[0, 0].add(1e-3)}}
  with pytest.raises(ValueError, match="not the draw of projection_prng_key=7"):
    dora_jax.save_adapters(tmp_path / "moved", moved, lean)
  assert not (tmp_path / "moved" / "dora_jax.json").exists()
