"""Benchmarks of dora_jax that print one JSON line per configuration.

- ``python -m bench.step_time``: training-step time, throughput, MFU and memory of the
  project's Llama with LoRA / DoRA (each DoRA execution path) and the frozen forward.
- ``python -m bench.peft_compare``: the same step in HF PEFT (torch, eager and
  ``torch.compile``) next to ours, with the ratios.
"""
