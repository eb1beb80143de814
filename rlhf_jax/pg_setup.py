"""The policy-gradient stage's own plumbing — config checks, the pretraining data of PPO-ptx, initial
params with or without a critic — kept out of `stages/pg.py` so that file reads as the algorithm (and out of
`stages/`, which holds stages only). What any online algorithm shares (prompts, sampling, keys, samples) is
`rlhf_jax.rollout`; the reward sources are `rlhf_jax.rewards`."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from rlhf_jax import checkpoint, config as config_lib, parallel, preference, rl, train_state, trained
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import RUNTIME_MODEL_FIELDS, Run


def ptx_data(run: Run, tok):
    """The pretraining windows PPO-ptx mixes in (InstructGPT eq. 2), or None when pg.ptx_coef is 0."""
    from rlhf_jax.data import lm_datasets
    from rlhf_jax.tasks import builtin_text

    c = run.config
    if c.pg.ptx_coef <= 0:
        return None
    data_dir = os.path.join(run.workdir, "data")
    text = c.data.ptx_path or os.path.join(data_dir, "builtin_corpus.txt")
    if not c.data.ptx_path and run.is_main:
        builtin_text.write_builtin_corpus(text, seed=c.seed)
    return run.main_first(lm_datasets.build_text_dataset, text, tok.path, c.data.ptx_seq_len, data_dir)["train"]


def init_params_fn(model, c):
    """Boxed {"policy": ..., ["critic": ...]} for sharded init."""
    one = train_state.model_init_fn(model, 8, c.seed)
    if c.pg.critic == "reward_model" and c.pg.advantage == "gae":
        return lambda: {"policy": one(), "critic": one()}
    return lambda: {"policy": one()}


def initial_params(run: Run, params):
    """Policy trunk + LM head from init_from; a zero value head (lm-human-preferences).
    With pg.critic="reward_model", the critic starts as the RM with its reward head as value head (InstructGPT),
    the RM's normalisation folded in: its first value at the last token is the normalised score PPO optimises."""
    out = {"policy": run.load_init_params(params["policy"], heads=("trunk", "lm_head"))}
    if "critic" in params:
        rm_dir = run.config.reward.rm_workdir
        norm = trained.load_reward_norm(rm_dir)
        if norm["ensemble_size"] > 1:
            raise ConfigError(
                f"config.pg.critic='reward_model' starts the critic from one RM, but {rm_dir} is an "
                f"ensemble of {norm['ensemble_size']}; use pg.critic='shared'."
            )
        arch = lambda m: {k: v for k, v in (m or {}).items() if k not in RUNTIME_MODEL_FIELDS}
        if arch((checkpoint.read_run_config(rm_dir) or {}).get("model")) != arch(run.config.model.to_dict()):
            raise ConfigError(
                "config.pg.critic='reward_model' needs the RM to have the policy's architecture; "
                "use pg.critic='shared' or train the RM from the same SFT workdir."
            )
        critic = checkpoint.load_base_params(rm_dir, params["critic"])
        # New arrays, not an alias: the train state is donated, and one buffer must not back two leaves.
        out["critic"] = {
            **critic,
            "value_head": preference.fold_normalization(
                critic["reward_head"], jnp.float32(norm["gain"]), jnp.float32(norm["bias"])
            ),
        }
    return out


# Keys every stage config has that this stage has no use for: a value other than the default is refused, never
# silently ignored.
UNUSED_KEYS = {
    "grad_accum": "an iteration's episodes are already cut into pg.num_minibatches minibatch updates per epoch; "
    "set pg.num_minibatches (more, smaller updates) instead",
    "eval_every": "it has no held-out evaluation: every iteration's metrics are of its own rollouts (and "
    "reward.monitor scores them with a second function); the pipeline judges the trained policy",
}
UNUSED_KEYS["eval_batches"] = UNUSED_KEYS["eval_every"]


def check_config(c) -> int:
    """rollout.samples_per_prompt (the group size G), checked with every policy-gradient setting that could
    otherwise be silently misread; run before any data is built."""
    defaults = config_lib.base_config()
    for key, why in UNUSED_KEYS.items():
        if c[key] != defaults[key]:
            raise ValueError(
                f"config.{key}={c[key]} has no effect in the policy-gradient stage: {why}. Leave "
                f"{key} at its default ({defaults[key]})."
            )
    k, B, base, M = c.rollout.samples_per_prompt, c.batch_size, c.pg.score_baseline, c.pg.num_minibatches
    adv = c.pg.advantage
    choices = (
        ("pg.advantage", adv, rl.ADVANTAGES),
        ("pg.loss_aggregation", c.pg.loss_aggregation, rl.AGGREGATIONS),
        ("pg.policy_loss", c.pg.policy_loss, tuple(rl.POLICY_LOSSES)),
        ("pg.rollout_correction", c.pg.rollout_correction, rl.CORRECTIONS),
        ("pg.correction_level", c.pg.correction_level, rl.CORRECTION_LEVELS),
        ("kl.estimator", c.kl.estimator, rl.KL_ESTIMATORS),
        ("kl.placement", c.kl.placement, ("reward", "loss")),
        ("pg.score_baseline", base, rl.SCORE_BASELINES),
        ("pg.critic", c.pg.critic, ("shared", "reward_model")),
    )
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"config.{key}={value!r} is unknown; use one of {allowed}.")
    if c.rollout.top_k > 0 or c.rollout.top_p < 1.0:
        # The trainer's log-probs are under softmax(logits / temperature) over the whole vocabulary; a token drawn
        # from a top-k / top-p truncation of it has a higher probability there (e.g. 0.58 nats a token higher at
        # top_k=3), so every ratio, KL and the sampler's gap would be off by that much.
        raise ConfigError(
            f"config.rollout.top_k={c.rollout.top_k} / top_p={c.rollout.top_p}: the policy-gradient stage's "
            f"log-probs are those of the untruncated distribution, which a top-k or top-p sample was not drawn "
            f"from. Sample with the temperature alone (top_k=0, top_p=1.0)."
        )
    if M < 1 or B % M:
        raise ConfigError(
            f"config.batch_size={B} episodes do not split into pg.num_minibatches={M} equal "
            f"minibatches; pick num_minibatches dividing batch_size (e.g. 4 with 64)."
        )
    if k < 1 or B % k or (B // k) % jax.process_count():
        raise ConfigError(
            f"config.rollout.samples_per_prompt={k} must be >= 1 and divide batch_size={B} into a "
            f"number of prompts that divides by the {jax.process_count()} process(es); e.g. "
            f"samples_per_prompt=4 with batch_size=64."
        )
    if base == "loo" and k < 2:
        raise ConfigError(
            "config.pg.score_baseline='loo' needs config.rollout.samples_per_prompt >= 2 (a "
            "prompt's other samples are its baseline)."
        )
    if adv == "rloo" and k < 2:
        raise ConfigError(
            "config.pg.advantage='rloo' needs config.rollout.samples_per_prompt >= 2: each sample's "
            "baseline is the mean of its prompt's other samples."
        )
    if adv in ("grpo", "dr_grpo") and k < 2:
        raise ConfigError(
            f"config.pg.advantage={adv!r} with samples_per_prompt={k}: a group of one has advantage "
            f"0, so nothing would be learnt. Use samples_per_prompt >= 2 (DeepSeekMath: 64)."
        )
    if c.pg.critic == "reward_model" and adv != "gae":
        raise ConfigError(
            f"config.pg.critic='reward_model' with pg.advantage={adv!r}: only 'gae' uses a critic. "
            f"Use pg.critic='shared' (ignored without a critic) or pg.advantage='gae'."
        )
    if c.pg.dynamic_sampling and (k < 2 or c.pg.dynamic_sampling_max_draws < 1):
        raise ConfigError(
            f"config.pg.dynamic_sampling with samples_per_prompt={k} and dynamic_sampling_max_draws="
            f"{c.pg.dynamic_sampling_max_draws}: it drops groups whose samples all score the same, so it needs "
            f"samples_per_prompt >= 2 (a group of one always ties) and at least one draw (DAPO: 16 and a few)."
        )
    if c.rollout.temperature <= 0:
        raise ConfigError(
            f"config.rollout.temperature={c.rollout.temperature}: the policy-gradient stage needs "
            f"the log-probs of a sampling distribution, and greedy decoding has none (every "
            f"log-prob would be log 0). Use a temperature > 0, e.g. 0.7."
        )
    return k


def ptx_batches(loader, iteration: int, run: Run):
    """The pretraining batch for every minibatch update of this iteration, flat [updates * b, L+1] (the
    loader's batch size is pg.ptx_batch_size × the iteration's updates), or None without PPO-ptx."""
    if loader is None:
        return None
    return parallel.global_batch(loader.get_batch(iteration), run.mesh, run.rules)
