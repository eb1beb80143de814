"""RM ensembles: an ensemble of E trained in one vmapped step equals E single RMs of seeds s..s+E-1 (each its
own init, data order and bootstrap resample); members are normalised one by one; mean / lcb / min and the
members' disagreement match hand-written references; resume is exact; a policy stage scores with the
chosen aggregate and refuses one that means nothing for a single RM."""

import json
import operator
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.ppo as ppo_cfg
import configs.rm as rm_cfg
from rlhf_jax import forward, parallel, preference, rewards
from rlhf_jax.data import comparisons
from rlhf_jax.metrics import read_metrics
from rlhf_jax.rollout import Rollout
from rlhf_jax.stages import rm
from rlhf_jax.trained import load_reward_model
from tests.helpers import by_step, resumed_from, stopped_copy, tiny
from tests.test_rm_stage import mesh_and_rules

E, STEPS = 3, 6
SETTINGS = {
    "num_steps": STEPS,
    "eval_every": STEPS,
    "checkpoint.every": 3,
    "rm.bootstrap": True,
    "optim.total_steps": STEPS,
}


# --- the maths against hand-written references -----------------------------------------------------------


def test_mean_lcb_min_match_a_hand_reference():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 7)).astype(np.float32)
    for how, lam, want in [
        ("mean", 1.0, s.mean(0)),
        ("lcb", 0.5, s.mean(0) - 0.5 * np.sqrt(((s - s.mean(0)) ** 2).mean(0))),
        ("lcb", 2.0, s.mean(0) - 2.0 * s.std(0)),
        ("min", 1.0, np.array([min(col) for col in s.T])),
    ]:
        np.testing.assert_allclose(preference.aggregate_rewards(jnp.asarray(s), how, lam), want, rtol=1e-5, atol=1e-6)
    one = s[:1]  # a single RM: every aggregate is its score
    for how in preference.AGGREGATES:
        np.testing.assert_allclose(preference.aggregate_rewards(jnp.asarray(one), how, 3.0), one[0], rtol=1e-6)
    with pytest.raises(ValueError, match="reward.aggregate='median'"):
        preference.aggregate_rewards(jnp.asarray(s), "median")


def test_disagreement_counts_member_pairs_that_order_a_response_pair_differently():
    r = np.array([[[3.0, 2.0, 1.0]], [[3.0, 1.0, 2.0]], [[1.0, 2.0, 3.0]]], np.float32)  # [E=3, B=1, K=3]
    valid = np.array([[1, 1, 1]])
    by_hand, count = 0, 0
    for a in range(3):
        for b in range(a + 1, 3):
            for i in range(3):
                for j in range(i + 1, 3):
                    count += 1
                    by_hand += np.sign(r[a, 0, i] - r[a, 0, j]) != np.sign(r[b, 0, i] - r[b, 0, j])
    assert float(preference.ranking_disagreement(jnp.asarray(r), jnp.asarray(valid))) == pytest.approx(by_hand / count)
    assert float(preference.ranking_disagreement(jnp.asarray(r[:1]), jnp.asarray(valid))) == 0.0
    # a response that does not exist takes part in no pair
    assert float(preference.ranking_disagreement(jnp.asarray(r[:2]), jnp.asarray([[1, 1, 0]]))) == 0.0


# --- the stage ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble_and_singles(tmp_path_factory):
    """An ensemble of E (bootstrap resamples) and the E single RMs of seeds 0..E-1, each trained STEPS steps."""
    from rlhf_jax.data import builtin_preferences

    root = tmp_path_factory.mktemp("rm_ensemble")
    # One set of comparisons for all (the built-in set would otherwise be drawn with each run's seed).
    train, held_out = builtin_preferences.write(str(root / "data"), seed=0, n_train=400)
    data = {"data.train_path": train, "data.eval_path": held_out}
    ens = str(root / "ensemble")
    out = rm.train_and_evaluate(tiny(rm_cfg, **SETTINGS, **data, **{"rm.ensemble_size": E}), ens)
    singles = [str(root / f"seed{i}") for i in range(E)]
    for i, d in enumerate(singles):
        rm.train_and_evaluate(tiny(rm_cfg, seed=i, **SETTINGS, **data), d)
    return ens, out, singles


@pytest.mark.slow
def test_an_ensemble_trained_in_one_step_equals_single_rms_of_its_seeds(ensemble_and_singles):
    ens, out, singles = ensemble_and_singles
    mesh, rules = mesh_and_rules()
    _, params, norm = load_reward_model(ens, mesh, rules)
    assert norm["ensemble_size"] == E and len(norm["gain"]) == E
    for i, d in enumerate(singles):
        _, p, n = load_reward_model(d, mesh, rules)
        member = jax.tree.map(operator.itemgetter(i), params)
        # The ranking loss cannot see the reward head's bias (it cancels in every difference): its gradient is
        # float noise that Adam scales to lr-sized steps, so only its effect, the normalised score, is compared.
        member["reward_head"], p["reward_head"] = (dict(h, bias=0.0) for h in (member["reward_head"], p["reward_head"]))
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5), member, p
        )
        assert norm["gain"][i] == pytest.approx(n["gain"], rel=1e-3)
        # bias_e absorbs the head's bias: gain·(h·w + b) + bias is the same score
        assert norm["bias"][i] + norm["gain"][i] * float(params["reward_head"]["bias"][i, 0]) == pytest.approx(
            n["bias"] + n["gain"] * float(load_reward_model(d, mesh, rules)[1]["reward_head"]["bias"][0]), abs=1e-3
        )
    # the members differ (own heads, own resamples), so the ensemble is not E copies
    assert not np.allclose(params["reward_head"]["kernel"][0], params["reward_head"]["kernel"][1])
    # per-member metrics, the mean's accuracy and the members' disagreement are reported
    for key in (
        "eval/rm/accuracy",
        "eval/rm/member_accuracy_mean",
        "eval/rm/disagreement",
        *(f"eval/rm/member_{e}/accuracy" for e in range(E)),
    ):
        assert np.isfinite(out[key]), key
    assert 0.0 < out["eval/rm/disagreement"] < 0.5
    single_acc = [by_step(read_metrics(d))[STEPS]["eval/rm/accuracy"] for d in singles]
    np.testing.assert_allclose([out[f"eval/rm/member_{e}/accuracy"] for e in range(E)], single_acc, atol=2e-3)


@pytest.mark.slow
def test_each_member_is_normalised_on_the_reference_responses(ensemble_and_singles):
    ens, _, _ = ensemble_and_singles
    mesh, rules = mesh_and_rules()
    model, params, norm = load_reward_model(ens, mesh, rules)
    with open(os.path.join(ens, "config.json")) as f:
        c = json.load(f)
    source, _ = comparisons.build_comparison_dataset(
        c["data"]["train_path"],
        "ranked",
        os.path.join(ens, "tokenizer.model"),
        c["data"]["seq_len"],
        os.path.join(ens, "data"),
    )
    records = [source[i] for i in range(len(source))]
    tokens = np.concatenate([r["tokens"][r["valid"] > 0] for r in records])
    mask = np.concatenate([r["input_mask"][r["valid"] > 0] for r in records])
    # split over the mesh's data axis (a batch left unsharded would be scored whole on each of the 8 devices):
    # padded with copies of the first response to a multiple of the devices, which are dropped after
    n, pad = len(tokens), -len(tokens) % mesh.size
    sharding = parallel.batch_sharding(mesh, rules)
    tokens, mask = (jax.device_put(np.concatenate([x, np.repeat(x[:1], pad, 0)]), sharding) for x in (tokens, mask))
    z = jax.jit(lambda p, t, m: forward.member_scores(p, model, norm, t, m))(params, tokens, mask)
    z = np.asarray(z, np.float64)[:, :n]
    assert z.shape == (E, n)
    np.testing.assert_allclose(z.mean(1), 0.0, atol=1e-2)
    np.testing.assert_allclose(z.std(1), 1.0, atol=1e-2)
    assert len(set(np.round(norm["gain"], 4))) == E  # each member its own gain


@pytest.mark.slow
def test_the_policy_reward_is_the_aggregate_of_the_single_rms_scores(ensemble_and_singles, tmp_path):
    from rlhf_jax.run import Run

    ens, _, singles = ensemble_and_singles
    mesh, rules = mesh_and_rules()
    model, params, norm = load_reward_model(ens, mesh, rules)
    tokens = jax.random.randint(jax.random.key(1), (8, 20), 1, model.cfg.vocab_size)
    mask = (jnp.arange(20)[None, :] < jnp.arange(5, 21, 2)[:, None]).astype(jnp.int32)
    each = []
    for d in singles:
        _, p, n = load_reward_model(d, mesh, rules)
        each.append(np.asarray(forward.score_sequences(p, model, n, tokens, mask)))
    each = np.stack(each)
    rollout = Rollout(tokens[:, :10], mask[:, :10], tokens[:, 10:], mask[:, 10:], ended=None, sampler_logprobs=None)
    for how, lam in [("mean", 1.0), ("lcb", 0.5), ("min", 1.0)]:
        got, mean, std, _ = rewards.RewardModel(model, params, norm, how, lam).on_device(params, rollout)
        np.testing.assert_allclose(got, preference.aggregate_rewards(jnp.asarray(each), how, lam), atol=2e-3)
        np.testing.assert_allclose(mean, each.mean(0), atol=2e-3)
        np.testing.assert_allclose(std, each.std(0), atol=2e-3)
    # on one RM, lcb / min are its score: asking for them is refused, not silently ignored
    c = tiny(ppo_cfg, **{"reward.kind": "rm", "reward.rm_workdir": singles[0], "reward.aggregate": "lcb"})
    with pytest.raises(ValueError, match="is one RM"):
        rewards.source(Run(c, str(tmp_path / "ppo")), c, tok=None)


@pytest.mark.slow
def test_ensemble_resume_equals_an_uninterrupted_run(ensemble_and_singles, tmp_path, capsys):
    """The fixture's ensemble command again, in a copy of its workdir stopped at the step-3 checkpoint."""
    ens, _, _ = ensemble_and_singles
    with open(os.path.join(ens, "config.json")) as f:
        used = json.load(f)["data"]
    data = {f"data.{k}": used[k] for k in ("train_path", "eval_path")}  # the fixture's comparisons
    resumed = stopped_copy(ens, tmp_path / "resumed", 3)
    rm.train_and_evaluate(tiny(rm_cfg, **SETTINGS, **data, **{"rm.ensemble_size": E}), str(resumed))
    assert resumed_from(capsys.readouterr().out) == 3
    a, b = by_step(read_metrics(ens)), by_step(read_metrics(str(resumed)))
    for key in (
        "rm/loss",
        "rm/grad_norm",
        *(f"rm/member_{e}/loss" for e in range(E)),
        "eval/rm/accuracy",
        "eval/rm/disagreement",
    ):
        assert a[STEPS][key] == pytest.approx(b[STEPS][key], rel=1e-5), key
    with open(os.path.join(ens, rm.NORM_FILE)) as f, open(os.path.join(resumed, rm.NORM_FILE)) as g:
        np.testing.assert_allclose(json.load(f)["gain"], json.load(g)["gain"], rtol=1e-5)


def test_a_bad_ensemble_size_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="rm.ensemble_size=0 must be a positive integer"):
        rm.train_and_evaluate(tiny(rm_cfg, **{"rm.ensemble_size": 0}), str(tmp_path))
