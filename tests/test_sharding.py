"""Sharding: a step on a (data, fsdp, tensor) mesh equals the one-device step, and params really shard."""

import jax
import numpy as np
import optax
import pytest

from rlhf_jax import parallel, train_state
from rlhf_jax.models.gpt import TransformerLM
from rlhf_jax.models.layers import ModelConfig
from rlhf_jax.stages.lm import make_train_step

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, dtype="float32")


def batch(seed=0, B=8, L=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, CFG.vocab_size, (B, L + 1)).astype(np.int32)
    loss_mask = np.ones_like(tokens)
    loss_mask[:, :5] = 0  # SFT-like: prompt tokens carry no loss
    return {"tokens": tokens, "input_mask": np.ones_like(tokens), "loss_mask": loss_mask}


def run_steps(mesh_shape, devices, n_steps=3, grad_accum=1):
    model = TransformerLM(CFG)
    mesh = parallel.make_mesh(mesh_shape, devices)
    rules = parallel.DEFAULT_RULES
    tx = optax.adamw(1e-2)
    state, sh = train_state.create(train_state.model_init_fn(model, 12, 0), tx, mesh, rules, seed=0)
    with parallel.activate(mesh, rules):
        step = jax.jit(
            make_train_step(model, tx, lambda s: 1e-2, grad_accum),
            in_shardings=(sh, parallel.batch_sharding(mesh, rules)),
            out_shardings=(sh, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )
        losses = []
        for i in range(n_steps):
            state, m = step(state, parallel.global_batch(batch(i), mesh, rules))
            losses.append(float(m["train/loss"]))
    return state, losses


def test_sharded_step_equals_single_device_step():
    one, l1 = run_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    eight, l8 = run_steps(dict(data=2, fsdp=2, tensor=2), jax.devices())
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    # Adam divides by sqrt(v): reduction-order differences of ~1e-7 in a gradient become ~1e-5 in a step.
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)

    up = eight.params["trunk"]["block_0"]["mlp"]["up"]["kernel"]  # [embed, mlp] = [32, 64]
    assert up.sharding.shard_shape(up.shape) == (16, 32)  # embed over fsdp=2, mlp over tensor=2
    q = eight.params["trunk"]["block_0"]["attn"]["query"]["kernel"]  # [embed, heads, kv]
    assert q.sharding.shard_shape(q.shape) == (16, 2, 8)
    mu = eight.opt_state[0].mu["trunk"]["block_0"]["mlp"]["up"]["kernel"]
    assert mu.sharding.shard_shape(mu.shape) == (16, 32)  # Adam moments shard like the params


def test_fsdp_divides_parameter_bytes():
    full, _ = run_steps(dict(data=8, fsdp=1, tensor=1), jax.devices(), n_steps=1)
    fsdp, _ = run_steps(dict(data=1, fsdp=8, tensor=1), jax.devices(), n_steps=1)
    total = sum(x.nbytes for x in jax.tree.leaves(full.params))
    assert parallel.per_device_bytes(full.params) == total  # data parallel: replicated
    # FSDP: every matrix shards its embed axis 8 ways; only small vectors (biases) stay whole.
    assert parallel.per_device_bytes(fsdp.params) < 0.2 * total


def test_gradient_accumulation_equals_full_batch():
    _, a = run_steps(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2], grad_accum=1)
    _, b = run_steps(dict(data=2, fsdp=1, tensor=1), jax.devices()[:2], grad_accum=2)
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,msg",
    [
        (dict(data=3, fsdp=1, tensor=1), "8 are available"),
        (dict(data=-1, fsdp=3, tensor=1), "does not divide"),
    ],
)
def test_mesh_that_does_not_fit_is_a_clear_error(shape, msg):
    with pytest.raises(ValueError, match=msg):
        parallel.make_mesh(shape)


def test_batch_not_divisible_is_a_clear_error():
    mesh = parallel.make_mesh(dict(data=4, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="config.batch_size=12 is not divisible by the 8"):
        parallel.check_batch(12, mesh, parallel.DEFAULT_RULES)


def test_restore_target_is_built_inside_or_outside_an_active_mesh():
    # A stage loads an RM while its own mesh is active (online DPO does); the restore target must not depend on
    # whether one is.
    model = TransformerLM(CFG)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
    init = train_state.model_init_fn(model, 12, 0)
    outside = parallel.abstract_params(init, mesh, parallel.DEFAULT_RULES)
    with parallel.activate(mesh, parallel.DEFAULT_RULES):
        inside = parallel.abstract_params(init, mesh, parallel.DEFAULT_RULES)
    assert jax.tree.structure(inside) == jax.tree.structure(outside)
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(outside)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.sharding == b.sharding
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(inside))


def test_a_state_started_from_loaded_params_equals_random_init_then_load():
    """train_state.create(start=...): the leaves `start` loads replace the random init's inside the jitted init
    (so that init is never computed); every other leaf (here the LoRA adapters and the heads) and the optimizer
    state are exactly those of a random init followed by the load, in the same shardings."""
    import dataclasses

    from rlhf_jax import lora
    from rlhf_jax.models.layers import LoraConfig

    model = TransformerLM(dataclasses.replace(CFG, lora=LoraConfig(rank=2)))
    mesh, rules = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2)), parallel.DEFAULT_RULES
    init, tx = train_state.model_init_fn(model, 12, 0), lora.optimizer(optax.adamw(1e-2), model.cfg)
    rng, given = np.random.default_rng(1), {}

    def start(like):  # an earlier stage's trunk (every weight but the adapters), as load_base_params gives it
        given["trunk"] = jax.tree.map(
            lambda x: jax.device_put(rng.normal(size=x.shape).astype(x.dtype), x.sharding),
            lora.without_adapters(like["trunk"]),
        )
        return {**like, "trunk": lora.with_adapters_of(given["trunk"], like["trunk"])}

    started, _ = train_state.create(init, tx, mesh, rules, seed=0, start=start)
    fresh, _ = train_state.create(init, tx, mesh, rules, seed=0)
    expected = fresh.replace(
        params={**fresh.params, "trunk": lora.with_adapters_of(given["trunk"], fresh.params["trunk"])}
    )
    got, want = jax.tree_util.tree_flatten_with_path(started)[0], jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        assert a.sharding == b.sharding and a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(  # the given trunk differs from the random init, so the comparison above has teeth
        np.asarray(jax.tree.leaves(given["trunk"])[0]),
        np.asarray(jax.tree.leaves(lora.without_adapters(fresh.params["trunk"]))[0]),
    )
    assert any("lora" in jax.tree_util.keystr(p) for p, _ in got)  # adapters present, equal to the fresh init's
