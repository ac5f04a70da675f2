"""Quickstart: DoRA on a Flax NNX model, trained with nnx.Optimizer over the adapters only.

Run: python examples/quickstart_nnx.py
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import dora_jax


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(8, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 64, rngs=rngs)
    self.head = nnx.Linear(64, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


model = MLP(nnx.Rngs(0))  # pretend it is pretrained
x = jax.random.normal(jax.random.key(1), (256, 8))
y = jnp.sin(x.sum(-1, keepdims=True))
base_out = model(x)

config = dora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True)
model = dora_jax.nnx.apply_adapters(model, config, nnx.Rngs(2))  # wraps fc1, fc2 in place
print("equals the base at init:", bool(jnp.allclose(model(x), base_out, atol=1e-6)))

# Adapters are their own Variable type: the optimizer sees them only, the base stays frozen.
optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=dora_jax.nnx.Adapter)


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, dora_jax.nnx.Adapter))(model)
  optimizer.update(model, grads)
  return loss


for i in range(200):
  loss = train_step(model, optimizer, x, y)
  if i % 50 == 0 or i == 199:
    print(f"step {i:3d}  loss {float(loss):.4f}")

adapted = model(x)
merged = dora_jax.nnx.merge_adapters(model)  # plain nnx.Linear layers holding W'
print("merged == adapted:", bool(jnp.allclose(merged(x), adapted, atol=1e-5)))
