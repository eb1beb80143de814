"""Faults: a non-finite loss never reaches a checkpoint, and a SIGKILLed run resumes to the same result."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs.rm as rm_cfg
from rlhf_jax import train_state
from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import lm, pg, rm
from rlhf_jax.train_state import NonFiniteError
from tests.helpers import ROOT, by_step, pretrain_cfg, tiny
from tests.test_pg_stage import config as ppo_config


def _tree_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_apply_if_finite_applies_a_finite_update_and_leaves_a_non_finite_one_out():
    tx = optax.adamw(1e-2)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.5, params)
    counter = jnp.array([0, -1], jnp.int32)

    new_params, new_opt, counter = train_state.apply_if_finite(
        tx, grads, jnp.float32(2.0), params, opt_state, counter, jnp.int32(3)
    )
    # the plain optax update, op by op, is the reference: the same to the last ulp or so (one compiled branch)
    updates, ref_opt = tx.update(grads, opt_state, params)
    for got, want in ((new_params, optax.apply_updates(params, updates)), (new_opt, ref_opt)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, want)
    assert counter.tolist() == [0, -1]

    bad = {"w": grads["w"].at[1, 2].set(jnp.inf), "b": grads["b"]}
    for loss, g, step in ((jnp.float32(2.0), bad, 7), (jnp.float32(jnp.nan), grads, 9)):
        kept_params, kept_opt, counter = train_state.apply_if_finite(
            tx, g, loss, new_params, new_opt, counter, jnp.int32(step)
        )
        assert _tree_equal(kept_params, new_params) and _tree_equal(kept_opt, new_opt)
    assert counter.tolist() == [2, 7]  # two skipped, the first at step 7


def test_the_guarded_update_writes_in_place_without_copying_the_optimizer_state():
    """A jitted step donating params and optimizer state updates them in place: the non-finite guard (a
    select between new and old state would make XLA copy every Adam moment first, 1 GB of SmolLM2's f32 DPO
    step's temporaries at its peak) leaves the compiled update no temporaries the size of a moment."""
    tx = optax.adamw(1e-3)
    params = {"w": jnp.zeros((1024, 1024)), "b": jnp.zeros((512, 256))}

    def step(params, opt_state, grads):
        counter = jnp.array([0, -1], jnp.int32)
        return train_state.apply_if_finite(tx, grads, jnp.float32(1.0), params, opt_state, counter, jnp.int32(0))

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < params["b"].nbytes


def test_nonfinite_stop_names_the_step_and_the_last_good_checkpoint_and_the_rerun_resumes(tmp_path):
    kw = {"num_steps": 20, "log_every": 5, "checkpoint.every": 5, "eval_every": 1000}
    with pytest.raises(NonFiniteError) as err:
        lm.train_and_evaluate(tiny(pretrain_cfg, debug_nonfinite_steps=(12,), **kw), str(tmp_path))
    msg = str(err.value)
    assert "step 12" in msg and f"{tmp_path}/checkpoints/10" in msg and "nonfinite=skip" in msg, msg
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())[-1] == 10  # 15 never saved

    # The start-up memory report of the same run: params replicated over the data axis, Adam's two moments.
    mem = json.loads((tmp_path / "memory.json").read_text())
    c = tiny(pretrain_cfg)
    d, L = c.model.d_model, c.model.n_layers
    assert mem["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mem["params_bytes_per_device"] > 4 * L * 12 * d * d  # at least the blocks' f32 matmul weights
    assert mem["opt_state_bytes_per_device"] >= 2 * mem["params_bytes_per_device"]
    assert mem["step_total_bytes"] >= mem["step_argument_bytes"] > mem["params_bytes_per_device"]

    out = lm.train_and_evaluate(tiny(pretrain_cfg, **kw), str(tmp_path))  # cause removed: the same command
    steps = [m["step"] for m in read_metrics(str(tmp_path)) if "train/loss" in m]
    assert steps == [5, 10, 15, 20]  # resumed at 10; the metrics of the failed attempt past 10 are gone
    assert np.isfinite(out["train/loss"]) and np.isfinite(out["eval/loss"])


def test_rm_nonfinite_stop_before_any_checkpoint_says_there_is_none(tmp_path):
    c = tiny(rm_cfg, num_steps=4, log_every=2, eval_every=1000, debug_nonfinite_steps=(0,), **{"checkpoint.every": 4})
    with pytest.raises(NonFiniteError, match=r"step 0 .*Last good checkpoint: none"):
        rm.train_and_evaluate(c, str(tmp_path))
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


def test_ppo_nonfinite_skip_counts_the_skipped_updates_and_finishes(tmp_path, capsys):
    c = ppo_config(num_steps=3, nonfinite="skip", debug_nonfinite_steps=(1,), **{"checkpoint.every": 3})
    pg.train_and_evaluate(c, str(tmp_path))
    updates = c.pg.epochs * c.pg.num_minibatches  # every minibatch update of iteration 1 is poisoned
    assert f"{updates} update(s) skipped" in capsys.readouterr().out
    m = by_step(read_metrics(str(tmp_path)))
    assert sorted(m) == [1, 2, 3]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "kl_coef"):
        assert np.isfinite(m[3][key]), key


def _kill_soak():
    spec = importlib.util.spec_from_file_location("kill_soak", os.path.join(ROOT, "scripts", "kill_soak.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sigkill_at_a_random_moment_resumes_from_the_last_complete_checkpoint(tmp_path):
    """A SIGKILL at a seeded random moment of a 45-step run (async checkpoints every 3 steps, so a kill may land
    mid-save); the relaunch must resume from the newest complete checkpoint, and the end result must equal, bit
    for bit, a run that was never killed. More trials (scripts/kill_soak.py --trials 10) only repeat these
    checks at other moments, at a process launch each; tests/test_kill_drill.py interrupts a 2-process run at 3
    more points."""
    out = _kill_soak().soak(trials=1, steps=45, seed=1, workdir=str(tmp_path / "soak"), print_fn=print)
    assert len(out["trials"]) == 1
    for t in out["trials"]:
        assert t["resumed_from"] == (t["complete"][-1] if t["complete"] else None), t
    assert out["same_losses"], (out["ref_losses"], out["losses"])
    assert out["same_params"]
