"""The optimiser: TF-style Adam, AdamW with its decay mask, clipping and schedules vs hand-written formulas."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import optim


def cfg(**overrides) -> ml_collections.ConfigDict:
    c = dict(
        name="adamw",
        lr=1e-2,
        schedule="constant",
        warmup_steps=0,
        total_steps=100,
        final_lr_fraction=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip_norm=0.0,
    )
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def params_and_grads(n_steps, seed=0):
    rng = np.random.default_rng(seed)
    params = {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,)), "embed": rng.normal(size=(5, 4))}
    grads = [{k: rng.normal(size=v.shape) * 3.0 for k, v in params.items()} for _ in range(n_steps)]
    return params, grads


def run_optax(tx, params, grads):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(params)
    step = jax.jit(lambda p, g, s: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))
    for g in grads:
        params, state = step(params, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state)
    return jax.tree.map(np.asarray, params)


def reference_adam(params, grads, lr_at, b1, b2, eps, *, tf_style, weight_decay=0.0, clip=0.0):
    """Float64 numpy loop of Adam / AdamW (decay on ndim ≥ 2) / TF1 AdamOptimizer, with global-norm clipping."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, start=1):
        if clip > 0:
            norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
            g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        lr = lr_at(t - 1)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            if tf_style:  # TF1 AdamOptimizer: lr_t = lr·sqrt(1−b2^t)/(1−b1^t); eps outside the correction
                direction = math.sqrt(1 - b2**t) / (1 - b1**t) * m[k] / (np.sqrt(v[k]) + eps)
            else:
                direction = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            decay = weight_decay * p[k] if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (direction + decay)
    return p


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def test_tf_adam_matches_the_tf1_formula_over_several_steps():
    params, grads = params_and_grads(6)
    c = cfg(name="tf_adam", eps=1e-5, b2=0.99)
    tx, _ = optim.make_optimizer(c)
    ref = reference_adam(params, grads, lambda s: c.lr, c.b1, c.b2, c.eps, tf_style=True)
    assert_tree_close(run_optax(tx, params, grads), ref)


def test_tf_adam_differs_from_optax_adam_when_eps_is_large():
    # One step of g = 1: TF gives sqrt(1−b2)/(1−b1)·m/(sqrt(v)+eps) = 0.0316/(0.0316+eps); optax 1/(1+eps).
    g = {"w": jnp.ones((2, 2))}
    for eps, should_differ in ((1e-1, True), (1e-12, False)):
        tf_u, _ = optim.scale_by_tf_adam(eps=eps).update(g, optim.scale_by_tf_adam(eps=eps).init(g))
        ox_u, _ = optax.scale_by_adam(eps=eps).update(g, optax.scale_by_adam(eps=eps).init(g))
        expect_tf = math.sqrt(1e-3) / (math.sqrt(1e-3) + eps)
        np.testing.assert_allclose(tf_u["w"], expect_tf, rtol=1e-5)
        np.testing.assert_allclose(ox_u["w"], 1.0 / (1.0 + eps), rtol=1e-5)
        assert bool(np.abs(tf_u["w"] - ox_u["w"]).max() > 0.1) == should_differ


def test_adamw_with_decay_mask_and_clipping_matches_reference():
    params, grads = params_and_grads(5, seed=1)
    c = cfg(
        name="adamw",
        weight_decay=0.3,
        grad_clip_norm=0.5,
        eps=1e-2,
        schedule="cosine",
        warmup_steps=2,
        total_steps=5,
        final_lr_fraction=0.1,
    )
    tx, schedule = optim.make_optimizer(c)
    lr_at = lambda s: float(schedule(s))
    ref = reference_adam(params, grads, lr_at, c.b1, c.b2, c.eps, tf_style=False, weight_decay=0.3, clip=0.5)
    got = run_optax(tx, params, grads)
    assert_tree_close(got, ref)
    # The test can tell: without clipping the result is measurably different (eps makes Adam scale-aware).
    unclipped = reference_adam(params, grads, lr_at, c.b1, c.b2, c.eps, tf_style=False, weight_decay=0.3)
    assert np.abs(unclipped["kernel"] - got["kernel"]).max() > 1e-4


def test_weight_decay_touches_only_parameters_with_two_or_more_dims():
    params = {
        "kernel": jnp.full((3, 2), 2.0),
        "embed": jnp.full((4, 3), -1.0),
        "bias": jnp.ones((2,)),
        "scale": jnp.ones((3,)),
    }
    tx, _ = optim.make_optimizer(cfg(weight_decay=0.5, lr=0.1))
    zero_grads = jax.tree.map(jnp.zeros_like, params)  # Adam's direction is then 0: only decay moves params
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["embed"], -0.1 * 0.5 * -1.0, rtol=1e-6)
    assert np.all(np.asarray(updates["bias"]) == 0) and np.all(np.asarray(updates["scale"]) == 0)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_closed_form(kind):
    lr, warm, total, frac = 2e-3, 10, 110, 0.1
    s = optim.make_schedule(lr, kind, warm, total, frac)
    final = lr if kind == "constant" else lr * frac
    mid = {
        "constant": lr,
        "linear": (lr + final) / 2,
        "cosine": final + (lr - final) * 0.5 * (1 + math.cos(math.pi / 2)),
    }
    quarter = {
        "constant": lr,
        "linear": lr - 0.25 * (lr - final),
        "cosine": final + (lr - final) * 0.5 * (1 + math.cos(math.pi / 4)),
    }
    np.testing.assert_allclose(float(s(0)), 0.0, atol=1e-12)
    np.testing.assert_allclose(float(s(warm // 2)), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(s(warm)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(s(warm + 25)), quarter[kind], rtol=1e-5)
    np.testing.assert_allclose(float(s(warm + 50)), mid[kind], rtol=1e-5)
    np.testing.assert_allclose(float(s(total)), final, rtol=1e-5)
    np.testing.assert_allclose(float(s(total + 1000)), final, rtol=1e-5)  # held after the horizon
    np.testing.assert_allclose(float(jax.jit(s)(jnp.int32(warm + 50))), mid[kind], rtol=1e-5)


def test_linear_schedule_is_lm_human_preferences_anneal():
    lr, n_updates = 1e-5, 40
    s = optim.make_schedule(lr, "linear", 0, n_updates, 0.0)
    for step in (0, 1, 17, 39, 40):
        np.testing.assert_allclose(float(s(step)), lr * (1 - step / n_updates), rtol=1e-5, atol=1e-12)


def test_update_is_jittable_and_sharded_params_give_the_one_device_result():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    params, grads = params_and_grads(3, seed=2)
    params = {"kernel": np.random.default_rng(3).normal(size=(8, 4)), "bias": params["bias"]}
    grads = [
        {"kernel": np.random.default_rng(10 + i).normal(size=(8, 4)), "bias": g["bias"]} for i, g in enumerate(grads)
    ]
    tx, _ = optim.make_optimizer(cfg(name="tf_adam", weight_decay=0.1, grad_clip_norm=1.0))
    expected = run_optax(tx, params, grads)

    shard = {"kernel": NamedSharding(mesh, PartitionSpec("fsdp", None)), "bias": NamedSharding(mesh, PartitionSpec())}
    p = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), shard)
    state = tx.init(p)  # eagerly, like optax.adam: the moments take the params' sharding
    assert state[1].mu["kernel"].sharding.is_equivalent_to(shard["kernel"], 2)

    @jax.jit
    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for g in grads:
        p, state = step(p, jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), shard), state)
    assert p["kernel"].sharding.is_equivalent_to(shard["kernel"], 2)
    assert_tree_close(jax.tree.map(np.asarray, p), expected)


def test_init_on_boxed_params_keeps_logical_axes():
    # train_state.create builds the optimizer state from nn.Partitioned params so moments shard like them.
    boxed = {
        "kernel": nn.Partitioned(jnp.ones((4, 3)), names=("embed", "mlp")),
        "bias": nn.Partitioned(jnp.ones((3,)), names=("mlp",)),
    }
    tx, _ = optim.make_optimizer(cfg(weight_decay=0.1, grad_clip_norm=1.0))
    state = tx.init(boxed)
    specs = nn.get_partition_spec(state)
    assert specs[1].mu["kernel"] == PartitionSpec("embed", "mlp")
    unboxed = nn.unbox(state)
    params = nn.unbox(boxed)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), unboxed, params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)


def test_bad_settings_say_what_to_change():
    with pytest.raises(ValueError, match="weight_decay"):
        optim.make_optimizer(cfg(name="adam", weight_decay=0.1))
    with pytest.raises(ValueError, match="optim.name"):
        optim.make_optimizer(cfg(name="sgd"))
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_optimizer(cfg(schedule="cosine", total_steps=0))
