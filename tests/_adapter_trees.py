"""Shared test data for the checkpoint tests: Llama-shaped params (unscanned or
scanned) with random, nonzero adapters on four module kinds, and a tree equality check."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import dora_jax

L, D, KV, F, V, R = 3, 8, 4, 12, 16, 2
TARGETS = ("q_proj", "v_proj", "down_proj", "embed_tokens")


def _rand(seed, shape, dtype=np.float32):
  """numpy randoms (jax.random compiles once per shape: slow on a small CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def unscanned_params(d=D):
  """A Llama-shaped params tree with one entry per layer (``layers_{i}``)."""
  layers = {
      f"layers_{i}": {
          "self_attn": {
              "q_proj": {"kernel": _rand(10 * i + 1, (d, d))},
              "v_proj": {"kernel": _rand(10 * i + 2, (d, KV))},
          },
          "mlp": {"down_proj": {"kernel": _rand(10 * i + 3, (F, d))}},
          "input_layernorm": {"scale": jnp.ones((d,))},
      }
      for i in range(L)
  }
  return {
      "model": {"embed_tokens": {"embedding": _rand(99, (V, d))}, **layers},
      "lm_head": {"kernel": _rand(98, (d, V))},
  }


def _stack_layers(tree):
  """``model/layers_{i}/...`` -> ``model/layers/...`` with a leading layer axis."""
  model = dict(tree["model"])
  layers = [model.pop(f"layers_{i}") for i in range(L)]
  model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**tree, "model": model}


def scanned_params():
  """The same weights with the layers stacked on a leading axis (``nn.scan``)."""
  return _stack_layers(unscanned_params())


def _adapter(seed, i_dim, o_dim, use_dora, dtype):
  out = {"lora_a": _rand(seed, (i_dim, R)), "lora_b": _rand(seed + 1, (R, o_dim))}
  if use_dora:
    out["magnitude"] = jnp.abs(_rand(seed + 2, (o_dim,))) + 0.5
  return {k: v.astype(dtype) for k, v in out.items()}


def make(scanned=False, use_dora=True, dtype=jnp.float32):
  """Params, random (nonzero) adapters on TARGETS, and their config."""
  config = dora_jax.LoraConfig(r=R, lora_alpha=4.0, target_modules=TARGETS, use_dora=use_dora,
                               init_lora_weights=False, adapter_dtype=dtype)
  dims = {"self_attn": {"q_proj": (D, D), "v_proj": (D, KV)}, "mlp": {"down_proj": (F, D)}}
  adapters = {"model": {"embed_tokens": _adapter(500, V, D, use_dora, dtype)}}
  for i in range(L):
    adapters["model"][f"layers_{i}"] = {
        sub: {mod: _adapter(100 * i + 10 * j, *io, use_dora, dtype)
              for j, (mod, io) in enumerate(mods.items())}
        for sub, mods in dims.items()
    }
  if scanned:
    return scanned_params(), _stack_layers(adapters), config
  return unscanned_params(), adapters, config


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_on_8_cpu_devices(script: str, *args: str) -> None:
  """Runs ``script`` (Python source) in a subprocess with 8 fake CPU devices; it must print OK."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script, *args], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


SHARDED_ADAPTERS = textwrap.dedent("""
    cfg = dora_jax.LoraConfig(r=4, target_modules=["q"], use_dora=True, init_lora_weights=False)
    rng = np.random.default_rng(0)
    ad = {"layers": {"q": {"lora_a": jnp.asarray(rng.standard_normal((4, 16, 4)), jnp.float32),
                           "lora_b": jnp.asarray(rng.standard_normal((4, 4, 8)), jnp.float32),
                           "magnitude": jnp.asarray(rng.random((4, 8)), jnp.float32)}}}
    m8 = Mesh(np.array(jax.devices()).reshape(4, 2), ("stage", "model"))
    on8 = {"layers": {"q": {"lora_a": NamedSharding(m8, P("stage", "model")),
                            "lora_b": NamedSharding(m8, P("stage", None, "model")),
                            "magnitude": NamedSharding(m8, P("stage", "model"))}}}
    ad8 = jax.device_put(ad, on8)
""")
"""Script lines (for the 8-device subprocess tests) that build scanned DoRA adapters ``ad`` and
put them on a 4x2 mesh as ``ad8``; the script imports jax, jnp, np, dora_jax, Mesh,
NamedSharding and P first."""
