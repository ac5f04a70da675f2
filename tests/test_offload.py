"""Optimizer state in pinned host memory: the same training, the state off the device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import dora_jax
from dora_jax import sharding as sh

pytestmark = pytest.mark.skipif(not sh.supports_host_offload(), reason="no pinned host memory")


def test_offloaded_adam_state_trains_identically():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  params = {"fc": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)}}
  cfg = dora_jax.LoraConfig(r=2, target_modules=["fc"], use_dora=True)
  ad = dora_jax.init_adapters(jax.random.key(0), params, cfg)
  x = jnp.ones((3, 8))
  rep = sh.replicated(mesh)
  a_sh = jax.tree.map(lambda _: rep, ad)
  tx = optax.adam(1e-2)
  o_sh = sh.opt_state_shardings(tx, a_sh, ad)
  host = sh.host_offloaded(o_sh)

  def loss(a):
    w = dora_jax.merge(params, a, cfg)["fc"]["kernel"]
    return jnp.sum(jnp.tanh(x @ w) ** 2)

  def step(a, st, offload):
    if offload:
      st = sh.to_device(st, o_sh)
    g = jax.grad(loss)(a)
    u, st = tx.update(g, st, a)
    return optax.apply_updates(a, u), st

  plain = jax.jit(lambda a, s: step(a, s, False))
  off = jax.jit(lambda a, s: step(a, s, True), in_shardings=(a_sh, host), out_shardings=(a_sh, host))
  a1, s1 = ad, tx.init(ad)
  a2, s2 = ad, jax.jit(tx.init, out_shardings=host)(ad)
  for _ in range(3):
    a1, s1 = plain(a1, s1)
    a2, s2 = off(a2, s2)
  for l1, l2 in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)):
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-7)
  kinds = {l.sharding.memory_kind for l in jax.tree.leaves(s2)}
  assert kinds == {"pinned_host"}
