"""Adapter files: save_adapters / load_adapters (Orbax + sidecar), config and shape checks."""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _adapter_trees import (SHARDED_ADAPTERS, D, R, TARGETS, assert_trees_equal, make,
                            run_on_8_cpu_devices, scanned_params, unscanned_params)

import dora_jax
from dora_jax import checkpoint as ckpt


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
# Multi-device: save on one mesh, restore on another (subprocess with 8 CPU devices)


RESHARD_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dora_jax
    from dora_jax import checkpoint as ckpt
    root = sys.argv[1]
    params = {"layers": {"q": {"kernel": jnp.ones((4, 16, 8))}}}
""") + SHARDED_ADAPTERS + textwrap.dedent("""
    ckpt.save_adapters(root + "/a", ad8, cfg)
    m2 = Mesh(np.array(jax.devices()[:2]), ("model",))
    on2 = jax.tree.map(lambda s: NamedSharding(m2, P(None, "model")), on8)
    back, _ = ckpt.load_adapters(root + "/a", cfg, params=params, shardings=on2)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
      assert x.sharding.mesh.shape == {"model": 2}, x.sharding
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    print("OK")
""")


@pytest.mark.multidevice
def test_reshard_between_meshes(tmp_path):
  run_on_8_cpu_devices(RESHARD_SCRIPT, str(tmp_path))
