"""The trainer's checkpointer: resumable training state (train.checkpoint.TrainCheckpointer)."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _adapter_trees import SHARDED_ADAPTERS, assert_trees_equal, make, run_on_8_cpu_devices

from train import checkpoint as ckpt


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
# Multi-device: save on one mesh, restore on another (subprocess with 8 CPU devices)


RESHARD_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dora_jax
    from train.checkpoint import TrainCheckpointer
    root = sys.argv[1]
""") + SHARDED_ADAPTERS + textwrap.dedent("""
    m2 = Mesh(np.array(jax.devices()[:2]), ("model",))
    opt = optax.adam(1e-3)
    state = {"adapters": ad8, "opt_state": opt.init(ad8), "rng": jax.random.key(1)}
    with TrainCheckpointer(root + "/t", cfg) as c:
      c.save(1, state)
    with TrainCheckpointer(root + "/t", cfg) as c:
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
          sharding=NamedSharding(m2, P())), jax.eval_shape(lambda: state))
      r = c.restore(target=target)
    assert r["opt_state"][0].mu["layers"]["q"]["lora_a"].sharding.mesh.shape == {"model": 2}
    np.testing.assert_array_equal(np.asarray(r["adapters"]["layers"]["q"]["lora_b"]),
                                  np.asarray(ad["layers"]["q"]["lora_b"]))
    print("OK")
""")


@pytest.mark.multidevice
def test_restore_on_another_mesh(tmp_path):
  run_on_8_cpu_devices(RESHARD_SCRIPT, str(tmp_path))
