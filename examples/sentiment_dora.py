"""DoRA-fine-tune SmolLM2-135M on Rotten Tomatoes with the library directly (no trainer).

Run: python examples/sentiment_dora.py [--steps 30]   (about 10 minutes on 2 CPU cores)

The task is classification as generation: the prompt is the review, the response is the word
"positive" or "negative"; accuracy compares the model's log-probabilities of the two words.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dora_jax
from dora_jax.models import Llama, load_smollm2
from train import data
from train.steps import at_loss_positions, loss_positions

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--eval-size", type=int, default=200)
args = parser.parse_args()

config, params, tokenizer = load_smollm2(scan_layers=True)
model = Llama(config, scan_layers=True)

task = data.load_task("rotten_tomatoes")
train_ex, eval_ex = data.split_examples(task.examples, args.eval_size, seed=0)
fmt = dict(chat_template=True, system_prompt="")
train = data.build_dataset(train_ex[: args.steps * args.batch_size], tokenizer, 64, **fmt)
prompts = data.prompt_rows(task, eval_ex, tokenizer, 64, **fmt)
label_ids = jnp.asarray(data.label_token_ids(tokenizer, task.labels, **fmt))
gold = np.array([ex.label_id for ex in eval_ex])

lora = dora_jax.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
adapters = dora_jax.init_adapters(jax.random.key(0), params, lora,
                                  layouts=dora_jax.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32)))
apply = dora_jax.wrap(model.apply, lora)


@jax.jit
def label_logprobs(params, adapters, ids, mask):  # params an argument: a closure would copy them into the executable
  last = mask.sum(1, keepdims=True) - 1  # the last prompt token predicts the label
  logits = apply(params, adapters, ids, attention_mask=mask, logits_at=last)[:, 0]
  return jax.nn.log_softmax(logits)[:, label_ids]


def accuracy(adapters):
  preds = []
  for i in range(0, len(gold), 50):
    preds.append(label_logprobs(params, adapters, prompts["input_ids"][i:i + 50],
                                prompts["attention_mask"][i:i + 50]).argmax(-1))
  return float(np.mean(np.concatenate(preds) == gold))


# The loss sits on the label and end-of-turn tokens only: compute the LM head (49k-word vocabulary)
# at those positions, not at all 64 (a [batch, 64, 49152] float32 logits tensor and its gradient).
train["logits_at"] = loss_positions(train["loss_mask"], 2)


def loss_fn(params, adapters, batch, rng):
  logits = apply(params, adapters, batch["input_ids"], attention_mask=batch["attention_mask"],
                 logits_at=batch["logits_at"])
  targets, mask = at_loss_positions(batch)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(nll * mask) / jnp.sum(mask)


print(f"zero-shot accuracy: {accuracy(adapters):.1%} (majority class {data.majority_class_rate(gold):.1%})")
warmup = min(5, args.steps // 2)  # the schedule needs decay steps after the warm-up
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 5e-4, warmup, max(args.steps, warmup + 1), 5e-5),
                 weight_decay=0.0, mask=dora_jax.weight_decay_mask)
opt_state = tx.init(adapters)
step = dora_jax.make_train_step(loss_fn, tx)
batches = data.BatchIterator(train, args.batch_size, seed=0)
t0 = time.time()
for i in range(args.steps):
  adapters, opt_state, m = step(params, adapters, opt_state, next(batches), jax.random.key(i))
  print(f"step {i + 1}/{args.steps} loss {float(m['loss']):.4f} ({time.time() - t0:.0f}s)", flush=True)
print(f"fine-tuned accuracy: {accuracy(adapters):.1%}")
