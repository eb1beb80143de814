"""Reward-model stage end to end: pads never change a reward, the built-in rule is learnt, normalised
rewards are mean 0 / std 1 on the reference distribution, resume is exact, a bad ranking names
file:line, init_from takes an LM's trunk and keeps a fresh reward head, grad_accum is exact."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import configs.pretrain as pretrain_cfg
import configs.rm as rm_cfg
from rlhf_jax import checkpoint, forward, parallel, train_state
from rlhf_jax.data import comparisons
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models.gpt import HEADS, TransformerLM
from rlhf_jax.models.layers import ModelConfig
from rlhf_jax.stages import lm, rm
from rlhf_jax.trained import load_reward_model
from tests.helpers import by_step, resumed_from, stopped_copy, tiny


def mesh_and_rules():
    return parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}), parallel.rules_from_config(parallel.DEFAULT_RULES)


def init_params(model, seed: int = 0):
    """Unsharded params of every head (one compiled init rather than op-by-op)."""
    t = jnp.ones((1, 4), jnp.int32)
    return jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(seed), t, t, t, heads=HEADS)["params"]))()


# --- pads --------------------------------------------------------------------------------------


def test_pads_on_either_side_do_not_change_a_reward():
    # bf16 compute, as the stage and PPO's scoring run; masked keys get exactly 0 attention, so only
    # summation order may differ (observed ~1e-7)
    tol = 1e-3
    model = TransformerLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_len=32, dtype="bfloat16"))
    params = init_params(model)
    rewards = jax.jit(lambda t, m: forward.sequence_rewards(params, model, t, m))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 64, n, dtype=np.int32) for n in (5, 12)]
    alone = np.array([float(rewards(s[None], np.ones((1, len(s)), np.int32))[0]) for s in seqs])
    assert np.ptp(alone) > 10 * tol  # rewards depend on the tokens, so equality below means something

    L = 20  # pads hold random token ids: only input_mask may tell them apart
    first_real = {"right pads": lambda n: 0, "left pads": lambda n: L - n, "pads on both sides": lambda n: 3}
    for name, start in first_real.items():
        tokens, mask = rng.integers(1, 64, (len(seqs), L), dtype=np.int32), np.zeros((len(seqs), L), np.int32)
        for i, s in enumerate(seqs):
            a = start(len(s))
            tokens[i, a : a + len(s)], mask[i, a : a + len(s)] = s, 1
        got = np.asarray(rewards(tokens, mask))
        np.testing.assert_allclose(got, alone, atol=tol, rtol=tol, err_msg=name)


# --- the built-in rule, normalisation, resume ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """The `tiny` preset, trained once: (workdir, last metrics)."""
    workdir = str(tmp_path_factory.mktemp("rm_tiny"))
    return workdir, rm.train_and_evaluate(tiny(rm_cfg), workdir)


@pytest.mark.slow
def test_the_builtin_rule_is_learnt(tiny_rm):
    workdir, out = tiny_rm
    assert out["eval/rm/accuracy"] >= 0.95, out  # over all 200 held-out comparisons (1,200 pairs)
    assert out["eval/rm/chosen_reward"] > out["eval/rm/rejected_reward"]
    m = by_step(read_metrics(workdir))
    assert m[40]["rm/loss"] < 0.3  # log 2 = 0.69 while the rewards cannot tell responses apart
    assert m[40]["perf/tokens_per_sec"] > 0 and m[40]["perf/samples_per_sec"] > 0


def test_normalised_rewards_of_the_training_responses_have_mean_0_std_1(tiny_rm):
    workdir, _ = tiny_rm
    mesh, rules = mesh_and_rules()
    model, params, norm = load_reward_model(workdir, mesh, rules)
    with open(os.path.join(workdir, "config.json")) as f:
        c = json.load(f)
    source, stats = comparisons.build_comparison_dataset(  # the stage's own build, found in its cache
        c["data"]["train_path"],
        "ranked",
        os.path.join(workdir, "tokenizer.model"),
        c["data"]["seq_len"],
        os.path.join(workdir, "data"),
    )
    records = [source[i] for i in range(len(source))]
    tokens = np.concatenate([r["tokens"][r["valid"] > 0] for r in records])
    mask = np.concatenate([r["input_mask"][r["valid"] > 0] for r in records])
    assert len(tokens) == stats["responses"] == norm["num_rewards"] == 1600 and norm["step"] == 40

    with parallel.activate(mesh, rules):
        score = jax.jit(lambda p, t, m: forward.score_sequences(p, model, norm, t, m))
        r = np.asarray(score(params, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
    assert abs(r.mean()) < 1e-2 and abs(r.std() - 1.0) < 1e-2, (r.mean(), r.std())
    raw = (r - norm["bias"]) / norm["gain"]
    assert abs(raw.mean()) > 0.1 or abs(raw.std() - 1.0) > 0.1  # the raw rewards were not already normalised


def test_a_critic_started_from_the_rm_values_the_last_token_at_the_normalised_score(tiny_rm):
    # InstructGPT starts PPO's value function from the RM; the RM's normalisation is folded into the value head,
    # so the critic's first value at each sequence's last token is the score PPO is given there.
    from types import SimpleNamespace

    from rlhf_jax import pg_setup

    workdir, _ = tiny_rm
    model, params, norm = load_reward_model(workdir, *mesh_and_rules())
    assert abs(norm["gain"] - 1.0) > 1e-3 and abs(norm["bias"]) > 1e-3  # a fold that did nothing would show
    with open(os.path.join(workdir, "config.json")) as f:
        arch = ml_collections.ConfigDict(json.load(f)["model"])
    run = SimpleNamespace(
        config=SimpleNamespace(reward=SimpleNamespace(rm_workdir=workdir), model=arch),
        load_init_params=lambda p, heads: p,
    )
    critic = pg_setup.initial_params(run, {"policy": params, "critic": params})["critic"]
    tokens = jax.random.randint(jax.random.key(0), (6, 12), 1, model.cfg.vocab_size)
    mask = (jnp.arange(12)[None, :] < jnp.array([12, 9, 5, 12, 3, 7])[:, None]).astype(jnp.int32)  # ragged
    values = forward.apply(critic, model, tokens, mask, heads=("value",))["values"]
    last = mask.sum(1) - 1
    got = np.asarray(jnp.take_along_axis(values, last[:, None], 1)[:, 0])
    want = np.asarray(forward.score_sequences(params, model, norm, tokens, mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_stale_norm_file_is_refused(tiny_rm, tmp_path):
    workdir = str(tmp_path / "rm")
    shutil.copytree(tiny_rm[0], workdir)
    path = os.path.join(workdir, rm.NORM_FILE)
    with open(path) as f:
        norm = json.load(f)
    with open(path, "w") as f:
        json.dump({**norm, "step": 20}, f)
    with pytest.raises(ValueError, match="step 20 but the latest checkpoint .* is step 40"):
        load_reward_model(workdir, *mesh_and_rules())


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tiny_rm, tmp_path, capsys):
    full_dir, _ = tiny_rm  # the tiny preset: 40 steps, checkpoints every 20
    resumed = stopped_copy(full_dir, tmp_path / "resumed", 20)
    rm.train_and_evaluate(tiny(rm_cfg), str(resumed))  # the full command again: resumes at step 20
    assert resumed_from(capsys.readouterr().out) == 20
    a, b = by_step(read_metrics(full_dir)), by_step(read_metrics(str(resumed)))
    assert sorted(a) == sorted(b)
    for step in (20, 40):
        for key in ("rm/loss", "rm/accuracy", "rm/grad_norm", "rm/lr", "eval/rm/loss", "eval/rm/accuracy"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6), (step, key)
    for key in ("rm/norm_gain", "rm/norm_bias"):
        assert a[40][key] == pytest.approx(b[40][key], rel=1e-6), key


# --- bad data ------------------------------------------------------------------------------------------


def test_a_ranking_that_is_not_a_permutation_names_file_and_line(tiny_rm, tmp_path):
    good = {"prompt": "describe the day", "responses": ["sun joy", "mud rot", "calm gray"], "ranking": [0, 2, 1]}
    bad = tmp_path / "prefs.jsonl"
    bad.write_text("\n".join(json.dumps(x) for x in (good, good, {**good, "ranking": [0, 0, 1]})) + "\n")
    # learning the tokenizer reads the file first; with a given tokenizer the dataset build reads it
    for extra in ({}, {"data.tokenizer_path": os.path.join(tiny_rm[0], "tokenizer.model"), "data.num_responses": 3}):
        c = tiny(rm_cfg, **{"data.train_path": str(bad), "data.eval_path": "", **extra})
        with pytest.raises(ValueError, match=r"prefs\.jsonl:3: ranking=\[0, 0, 1\] is not a permutation"):
            rm.train_and_evaluate(c, str(tmp_path / f"run{len(extra)}"))


def test_unknown_rm_loss_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="config.rm.loss='rank'"):
        rm.train_and_evaluate(tiny(rm_cfg, **{"rm.loss": "rank"}), str(tmp_path))
    assert not os.path.exists(tmp_path / "data")


# --- init_from ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_init_from_an_lm_workdir_loads_the_trunk_and_keeps_a_fresh_reward_head(tmp_path):
    lm.train_and_evaluate(tiny(pretrain_cfg, num_steps=2), str(tmp_path / "pt"))  # seed 0
    # One step whose learning rate is 0 (the warmup starts there): the checkpoint holds the initial params.
    c = tiny(rm_cfg, num_steps=1, seed=1, init_from=str(tmp_path / "pt"))
    rm.train_and_evaluate(c, str(tmp_path / "rm"))
    assert read_metrics(str(tmp_path / "rm"))[0]["rm/lr"] == 0.0

    with open(tmp_path / "pt" / "config.json") as f:
        model = TransformerLM(ModelConfig(**json.load(f)["model"]))
    mesh, rules = mesh_and_rules()
    fresh, _ = parallel.sharded_init(train_state.model_init_fn(model, 8, 1), mesh, rules)  # the RM's seed
    pt = checkpoint.load_params(str(tmp_path / "pt"), fresh)
    got = checkpoint.load_params(str(tmp_path / "rm"), fresh)

    def same(x, y):
        return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))

    assert same(got["trunk"], pt["trunk"]) and not same(got["trunk"], fresh["trunk"])
    assert same(got["reward_head"], fresh["reward_head"]) and not same(got["reward_head"], pt["reward_head"])
    assert (tmp_path / "rm" / "tokenizer.model").read_bytes() == (tmp_path / "pt" / "tokenizer.model").read_bytes()


# --- gradient accumulation ----------------------------------------------------------------------------------


def test_grad_accum_gives_the_gradient_of_the_whole_batch_loss():
    """One step with 2 microbatches applies grad(rm_loss) of the whole batch (plain SGD, lr 1, so
    the update is the gradient itself), with uneven comparisons (1 to 4 valid responses), a margin
    and the centering penalty on."""
    model = TransformerLM(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_len=16, dtype="float32"))
    rm_c = ml_collections.ConfigDict(dict(loss="ranking", margin=0.5, center_coef=0.1, normalize_on="comparisons"))
    tx = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    B, K, L = 8, 4, 10
    valid = np.ones((B, K), np.int32)
    valid[0, 2:] = valid[3, 3] = valid[5, 2:] = valid[6, 1:] = 0  # row 6 is no comparison: left out
    mask = (np.arange(L)[None, None] < rng.integers(4, L + 1, (B, K, 1))).astype(np.int32) * valid[..., None]
    batch = {
        "tokens": jnp.asarray(rng.integers(1, 64, (B, K, L)), jnp.int32),
        "input_mask": jnp.asarray(mask),
        "valid": jnp.asarray(valid),
    }
    params = init_params(model)
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.PRNGKey(0)),
        extras={},
        nonfinite=jnp.array([0, -1], jnp.int32),
    )

    loss, grads = jax.jit(jax.value_and_grad(lambda p: rm.rm_loss(p, model, batch, rm_c)[0]))(state.params)
    assert float(loss) > 0.5  # the margin keeps the loss well away from 0
    # rows 0-3 and 4-7 hold 4 and 3 comparisons, 13 and 11 valid responses: a mean of their means would differ
    new, metrics = jax.jit(rm.make_train_step(model, tx, lambda step: 1.0, rm_c, grad_accum=2))(state, batch)
    assert float(metrics["rm/loss"]) == pytest.approx(float(loss), rel=1e-5)
    for p0, p1, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(p0) - np.asarray(p1), g, rtol=1e-4, atol=1e-7)
