"""Quickstart: DoRA on a Flax Linen model, end to end in 40 lines.

Run: python examples/quickstart_linen.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import dora_jax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64, name="fc1")(x))
    x = nn.relu(nn.Dense(64, name="fc2")(x))
    return nn.Dense(1, name="head")(x)


model = MLP()
x = jax.random.normal(jax.random.key(0), (256, 8))
y = jnp.sin(x.sum(-1, keepdims=True))
params = model.init(jax.random.key(1), x)["params"]  # pretend these are pretrained

config = dora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True)
adapters = dora_jax.init_adapters(jax.random.key(2), params, config)
apply = dora_jax.wrap(model.apply, config)  # apply(params, adapters, x)


def loss_fn(params, adapters, batch, rng):
  inputs, targets = batch
  return jnp.mean((apply(params, adapters, inputs) - targets) ** 2)


tx = optax.adam(1e-2)
opt_state = tx.init(adapters)
step = dora_jax.make_train_step(loss_fn, tx)  # jit; gradients for the adapters only
for i in range(200):
  adapters, opt_state, metrics = step(params, adapters, opt_state, (x, y), jax.random.key(i))
  if i % 50 == 0 or i == 199:
    print(f"step {i:3d}  loss {float(metrics['loss']):.4f}")

merged = dora_jax.merge(params, adapters, config)  # plain params for the unmodified model
print("merged == adapted:", bool(jnp.allclose(model.apply({"params": merged}, x), apply(params, adapters, x), atol=1e-5)))
print("trainable:", dora_jax.count_params(adapters), "of", dora_jax.count_params(params))
