"""dora_jax.sharding: param / adapter / optimizer-state shardings from logical axis names.

Spec-level tests run here on an ``AbstractMesh`` (no devices needed). Tests on real
meshes of 8 fake CPU devices read the JSON of ``tests/_multidevice.py``, run once per
session in a subprocess (the ``multidevice`` fixture of ``conftest.py``). The trainer's
meshes, batches and steps are tested in ``tests/test_train_mesh.py``.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

import dora_jax
from dora_jax import sharding as sh
from dora_jax.models.llama import LOGICAL_AXIS_RULES, Llama, LlamaConfig
from dora_jax.tree import KernelLayout
from train.mesh import describe

CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
LORA = dora_jax.LoraConfig(r=4, target_modules="all-linear", use_dora=True)
RULES = LOGICAL_AXIS_RULES


# ---------------------------------------------------------------------------
# Specs on an abstract mesh (data=1, fsdp=4, tensor=2)


def abstract_mesh(data=1, fsdp=4, tensor=2) -> AbstractMesh:
  return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("spec, shape, expected", [
    (("fsdp", "tensor"), (8, 6), P("fsdp", "tensor")),
    (("fsdp", "tensor"), (6, 6), P(None, "tensor")),       # 6 % 4: unsharded
    ((("data", "fsdp"),), (4, 3), P(("data", "fsdp"), None)),
    ((("fsdp", "tensor"),), (12,), P("fsdp")),            # longest dividing prefix of (fsdp, tensor)
    ((("tensor", "fsdp"),), (6,), P("tensor")),
    (("expert",), (8,), P(None)),                          # not a mesh axis
    ((), (3, 3), P(None, None)),
])
def test_fit_spec(spec, shape, expected):
  assert sh.fit_spec(spec, shape, abstract_mesh()) == expected


@pytest.mark.parametrize("kernel_spec, layout, a, b, m", [
    (("fsdp", "tensor"), KernelLayout(0, 1), P("fsdp", None), P(None, "tensor"), P("tensor")),
    ((None, "tensor", "fsdp"), KernelLayout(1, 1), P(None, "tensor", None), P(None, None, "fsdp"),
     P(None, "fsdp")),
    # [heads, head_dim, embed] -> I = heads*head_dim: the leading axis's shards stay contiguous.
    (("tensor", None, "fsdp"), KernelLayout(0, 2), P("tensor", None), P(None, "fsdp"), P("fsdp")),
    # ... a later input axis does not: replicated.
    ((None, "tensor", "fsdp"), KernelLayout(0, 2), P(None, None), P(None, "fsdp"), P("fsdp")),
    # [embed, heads, head_dim] -> O = heads*head_dim.
    (("fsdp", "tensor", None), KernelLayout(0, 1), P("fsdp", None), P(None, "tensor"), P("tensor")),
    (("fsdp", None, "tensor"), KernelLayout(0, 1), P("fsdp", None), P(None, None), P(None)),
])
def test_adapter_specs(kernel_spec, layout, a, b, m):
  assert sh.adapter_specs(kernel_spec, layout) == {"lora_a": a, "lora_b": b, "magnitude": m}


def llama_trees(scan: bool):
  model = Llama(CONFIG, scan_layers=scan)
  example = jnp.zeros((1, 8), jnp.int32)
  boxed = sh.abstract_params(model, example)
  layouts = dora_jax.kernel_layouts(model, example)
  adapters = jax.eval_shape(lambda p: dora_jax.init_adapters(jax.random.key(0), p, LORA, layouts=layouts),
                            nn.unbox(boxed))
  return boxed, adapters


@pytest.mark.parametrize("scan", [False, True])
def test_param_and_adapter_specs_follow_the_rules(scan):
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(scan)
  p_specs = describe(sh.param_shardings(boxed, mesh, RULES))
  a_specs = describe(sh.adapter_shardings(adapters, boxed, sh.param_shardings(boxed, mesh, RULES), mesh))
  layer = "model/layers" if scan else "model/layers_1"
  st = (None,) if scan else ()
  expect_p = {
      "model/embed_tokens/embedding": P("tensor", "fsdp"),   # (vocab, embed)
      "lm_head/kernel": P("fsdp", "tensor"),                 # (embed, vocab)
      "model/norm/scale": P(None),
      f"{layer}/input_layernorm/scale": P(*st, None),
      f"{layer}/self_attn/q_proj/kernel": P(*st, "fsdp", "tensor"),
      f"{layer}/self_attn/k_proj/kernel": P(*st, "fsdp", "tensor"),
      f"{layer}/self_attn/o_proj/kernel": P(*st, "tensor", "fsdp"),
      f"{layer}/mlp/up_proj/kernel": P(*st, "fsdp", "tensor"),
      f"{layer}/mlp/down_proj/kernel": P(*st, "tensor", "fsdp"),
  }
  for path, spec in expect_p.items():
    assert p_specs[path] == str(spec), path
  for name, (i, o) in {"q_proj": ("fsdp", "tensor"), "o_proj": ("tensor", "fsdp"),
                       "v_proj": ("fsdp", "tensor")}.items():
    base = f"{layer}/self_attn/{name}"
    assert a_specs[f"{base}/lora_a"] == str(P(*st, i, None))
    assert a_specs[f"{base}/lora_b"] == str(P(*st, None, o))
    assert a_specs[f"{base}/magnitude"] == str(P(*st, o))
  assert a_specs[f"{layer}/mlp/down_proj/lora_a"] == str(P(*st, "tensor", None))
  p_sh = sh.param_shardings(boxed, mesh, RULES)
  replicated = sh.adapter_shardings(adapters, boxed, p_sh, mesh, replicate=True)
  assert set(describe(replicated).values()) == {"P()"}


def test_indivisible_axes_fall_back_to_replicated(caplog):
  mesh = abstract_mesh(data=1, fsdp=1, tensor=8)
  tree = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 12), jnp.float32), ("embed", "mlp")),
          "v": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 12), jnp.float32), ("mlp", "embed")),
          "plain": jax.ShapeDtypeStruct((16,), jnp.float32)}
  with caplog.at_level("WARNING", logger="dora_jax"):
    specs = describe(sh.param_shardings(tree, mesh, RULES))
  assert specs == {"w": "P('fsdp', None)", "v": "P('tensor', 'fsdp')", "plain": "P()"}
  assert "not divisible" in caplog.text


def test_adapter_shardings_need_the_kernel_sharding():
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(False)
  with pytest.raises(ValueError, match="no sharding for the kernel"):
    sh.adapter_shardings(adapters, boxed, {}, mesh)


@pytest.mark.parametrize("make_tx", [
    lambda: optax.adamw(1e-3, mask=dora_jax.weight_decay_mask),
    lambda: optax.chain(optax.clip_by_global_norm(1.0),
                        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)),
])
def test_opt_state_shardings_mirror_the_adapters(make_tx):
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(True)
  a_sh = sh.adapter_shardings(adapters, boxed, sh.param_shardings(boxed, mesh, RULES), mesh)
  o_specs = describe(sh.opt_state_shardings(make_tx(), a_sh, adapters))
  a_specs = describe(a_sh)
  moments = {k: v for k, v in o_specs.items() if "/mu/" in k or "/nu/" in k}
  assert len(moments) == 2 * len(a_specs)
  for key, spec in moments.items():
    assert spec == a_specs[key.split("/mu/" if "/mu/" in key else "/nu/", 1)[1]], key
  assert all(v == "P()" for k, v in o_specs.items() if k not in moments)


def test_opt_state_shardings_through_freeze_base():
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(False)
  p_sh = sh.param_shardings(boxed, mesh, RULES)
  a_sh = sh.adapter_shardings(adapters, boxed, p_sh, mesh)
  combined = dora_jax.combine(nn.unbox(boxed), adapters)
  o_specs = describe(sh.opt_state_shardings(dora_jax.freeze_base(optax.adam(1e-3)),
                                               dora_jax.combine(p_sh, a_sh), combined))
  key = "inner_states/adapter/inner_state/0/mu/model/layers_0/self_attn/o_proj/lora_a"
  assert o_specs[key] == "P('tensor', None)"
  assert not any("kernel" in k for k in o_specs)  # the frozen base has no optimizer state


def test_path_sharding_fn():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  s = sh.replicated(mesh)
  fn = sh.path_sharding_fn({"model": {"norm": {"scale": s}}})
  assert fn(("model", "norm", "scale"), (4,), np.float32) is s
  assert fn(("model", "other"), (4,), np.float32) is None


def test_rules_from_the_argument_or_flax_context():
  mesh = abstract_mesh()
  boxed, _ = llama_trees(False)
  explicit = describe(sh.param_shardings(boxed, mesh, RULES))
  with nn.logical_axis_rules(RULES):
    from_context = describe(sh.param_shardings(boxed, mesh))
  assert from_context == explicit
  assert explicit["lm_head/kernel"] == "P('fsdp', 'tensor')"
  # Other rules, other shardings: nothing falls back to a built-in default.
  swapped = [(name, {"fsdp": "tensor", "tensor": "fsdp"}.get(axes, axes)) for name, axes in RULES]
  assert describe(sh.param_shardings(boxed, mesh, swapped))["lm_head/kernel"] == "P('tensor', 'fsdp')"


def test_logical_names_without_rules_are_an_error():
  mesh = abstract_mesh()
  boxed, _ = llama_trees(False)
  assert not nn.get_logical_axis_rules()
  with pytest.raises(ValueError, match=r"'lm_head/kernel' has logical axis .* no logical-axis rules.*rules="):
    sh.param_shardings(boxed, mesh)
  with pytest.raises(ValueError, match="no logical-axis rules"):
    sh.init_sharded(Llama(CONFIG), jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                    mesh=Mesh(np.array(jax.devices()), ("data",)))
  # Boxes without logical names need no rules.
  plain = {"w": nn.Partitioned(jax.ShapeDtypeStruct((8, 6), jnp.float32), ("fsdp", None)),
           "b": jax.ShapeDtypeStruct((6,), jnp.float32)}
  assert describe(sh.param_shardings(plain, mesh)) == {"w": "P('fsdp', None)", "b": "P()"}


def test_opt_state_shardings_need_mirroring_trees():
  mesh = abstract_mesh()
  boxed, adapters = llama_trees(False)
  a_sh = sh.adapter_shardings(adapters, boxed, sh.param_shardings(boxed, mesh, RULES), mesh)
  with pytest.raises(ValueError, match="must mirror each other"):
    sh.opt_state_shardings(optax.adam(1e-3), a_sh, {"only": adapters["model"]["layers_0"]})


def test_opt_state_shardings_replicate_state_of_another_shape():
  mesh = abstract_mesh()
  params = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32), "b": jax.ShapeDtypeStruct((6,), jnp.float32)}
  shardings = {"w": jax.sharding.NamedSharding(mesh, P("fsdp", "tensor")),
               "b": jax.sharding.NamedSharding(mesh, P("tensor"))}
  o_specs = describe(sh.opt_state_shardings(optax.adafactor(1e-3, min_dim_size_to_factor=2),
                                            shardings, params))
  # w is factored: v_row [6], v_col [8] and an unused [1] v have w's tree position, not its shape.
  assert o_specs["0/v_row/w"] == o_specs["0/v_col/w"] == o_specs["0/v/w"] == "P()"
  assert o_specs["0/v/b"] == "P('tensor',)"  # b [6] is not factored: v is b-shaped
  assert o_specs["0/count"] == "P()"


# ---------------------------------------------------------------------------
# 8 fake CPU devices (subprocess)


@pytest.mark.multidevice
def test_arrays_have_the_derived_shardings(multidevice):
  s = multidevice["shardings"]
  assert multidevice["devices"] == 8
  assert s["params"] == s["expected_params"]
  assert s["params"]["model/layers/self_attn/q_proj/kernel"] == "P(None, 'fsdp', 'tensor')"
  assert s["params"]["model/layers/mlp/down_proj/kernel"] == "P(None, 'tensor', 'fsdp')"
  ad = s["adapters"]
  assert ad["model/layers/self_attn/q_proj/lora_a"] == "P(None, 'fsdp', None)"
  assert ad["model/layers/self_attn/q_proj/lora_b"] == "P(None, None, 'tensor')"
  assert ad["model/layers/self_attn/q_proj/magnitude"] == "P(None, 'tensor')"
  assert ad["model/layers/mlp/down_proj/lora_a"] == "P(None, 'tensor', None)"
  assert ad["model/layers/mlp/down_proj/magnitude"] == "P(None, 'fsdp')"
  assert s["opt_mu"] == ad
  assert set(s["opt_other"].values()) == {"P()"}
  u = multidevice["unrolled"]
  assert u["params"]["model/layers_0/self_attn/o_proj/kernel"] == "P('tensor', 'fsdp')"
  assert u["adapters"]["model/layers_0/self_attn/o_proj/lora_b"] == "P(None, 'fsdp')"


@pytest.mark.multidevice
def test_sharded_init_matches_single_device(multidevice):
  assert multidevice["init_max_diff"]["params"] == 0.0
  assert multidevice["init_max_diff"]["adapters"] < 1e-6  # norms: summation order


@pytest.mark.multidevice
def test_per_device_base_bytes_shrink_with_fsdp_and_tensor(multidevice):
  b = multidevice["bytes"]
  per = [b["per_device"][k] for k in ("data=8", "data=4,fsdp=2", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")]
  assert per[0] == b["total"]
  assert all(x > y for x, y in itertools.pairwise(per)), per
  assert per[-1] < b["total"] / 6  # 8-way, except the (replicated) norm scales


@pytest.mark.multidevice
def test_same_loss_curve_on_every_mesh(multidevice):
  losses = multidevice["losses"]
  ref = np.array(losses["single"])
  assert abs(ref[-1] - ref[0]) > 1e-4  # the adapters do train
  for spec, curve in losses.items():
    np.testing.assert_allclose(curve, ref, rtol=1e-5, err_msg=spec)


@pytest.mark.multidevice
def test_tensor_parallel_dora_step_gathers_no_kernel(multidevice):
  hlo = multidevice["hlo"]
  assert hlo["data=4,tensor=2"]["full_kernel_gathers"] == []
  assert hlo["data=4,tensor=2"]["all_reduces"] > 0  # the partial sums of o/down_proj
  # The detector works: FSDP gathers kernel shards before the matmuls, as expected.
  assert hlo["fsdp=4,tensor=2"]["full_kernel_gathers"]
