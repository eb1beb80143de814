"""Stage 5: direct preference optimisation from an SFT policy, on the comparisons the RM reads (or online).

    python -m rlhf_jax.main --config=configs/dpo.py:tiny --workdir=runs/dpo_tiny     # built-in rule, seconds
    python -m rlhf_jax.main --config=configs/dpo.py --workdir=runs/dpo --config.init_from=runs/sft \
        --config.data.train_path=comparisons.jsonl --config.data.format=ranked
    python -m rlhf_jax.main --config=configs/dpo.py:hh_rlhf --workdir=runs/dpo_hh \
        --config.data.train_path=../shared/data/hh_rlhf_harmless_dev.jsonl.gz
    python -m rlhf_jax.main --config=configs/dpo.py:online_dpo --workdir=runs/online_dpo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --config.policy=dpo --workdir=runs/dpo_pipeline \
        --config.reuse_from=runs/quickstart      # the main job's SFT and comparisons, DPO as the policy stage

Presets: default (= dpo), tiny, hh_rlhf, and each of ALGORITHMS by name (ipo, simpo, plackett_luce, online_dpo),
also with a _tiny suffix. Formats as configs/rm.py: ranked, pairwise, hh_rlhf, tldr; empty train_path: the
built-in synthetic preference with a known rule (configs/rm.py:tiny's data).

The papers' settings, by loss (config.dpo.*):
  dpo            β = 0.1 (Rafailov et al. 2023's default); label
                 smoothing 0 (> 0 is conservative DPO); pairs: every pair of a K-way ranking, weighted as
                 the RM's eq. 1 (1/C(K,2) per prompt), so DPO sees what the RM saw
  ipo            τ = β = 0.1 (as TRL's default; Azar et al. 2023 sweep τ): a margin target 1/(2τ) = 5 nats
  simpo          β = 2.0, γ = 1.0 (Meng et al. 2024 tune β in about 2-2.5 with γ/β near 0.5); no reference model
  plackett_luce  β = 0.1, the whole K-way ranking (Rafailov et al. 2023, Appendix A.3)
  online_dpo     DPO on online.samples_per_prompt = 2 samples of the current policy per prompt, ranked by
                 config.reward, one update each (Guo et al. 2024's OAIF: two responses, an annotator's choice)
"""

from rlhf_jax.config import base_config, tiny_preset
from rlhf_jax.errors import ConfigError

ALGORITHMS = {
    "dpo": dict(dpo=dict(loss="dpo", beta=0.1)),
    "ipo": dict(dpo=dict(loss="ipo", beta=0.1)),
    "simpo": dict(dpo=dict(loss="simpo", beta=2.0, gamma=1.0)),
    "plackett_luce": dict(dpo=dict(loss="plackett_luce", beta=0.1)),
    "online_dpo": dict(dpo=dict(loss="dpo", beta=0.1, online=True), online=dict(samples_per_prompt=2)),
}
LABELS = {
    "dpo": "DPO",
    "ipo": "IPO",
    "simpo": "SimPO",
    "plackett_luce": "Plackett-Luce DPO",
    "online_dpo": "online DPO",
}


def get_config(preset: str = "default"):
    c = base_config()
    c.stage = "dpo"
    # Offline: comparisons (configs/rm.py's keys); online: prompts (configs/ppo.py's keys) and, optionally,
    # held-out comparisons (eval_path) to measure the implicit reward model on.
    c.data.update(
        train_path="",
        eval_path="",
        format="ranked",
        train_lines=(),
        eval_lines=(),
        num_responses=0,
        builtin_examples=2000,
        seq_len=128,
        # each offline batch is cut to the smallest width of length_bucket·{1, 3/2, 2, 3, 4, ...} holding its
        # longest response row, capped at seq_len, so short pairs cost little padding in few compiled shapes
        # (0: always seq_len)
        length_bucket=16,
        prompts_path="",
        prompts_format="prompt",
        prompts_lines=(),
        max_prompt_len=64,
    )
    c.model.update(d_model=128, n_layers=4, n_heads=4, max_len=256)
    # loss: dpo | ipo | simpo | plackett_luce; gamma: SimPO's margin; pairs: all | best_worst (pairwise losses)
    c.dpo = dict(loss="dpo", beta=0.1, label_smoothing=0.0, gamma=0.0, pairs="all", online=False)
    c.online = dict(samples_per_prompt=2, updates_per_iteration=1)  # K samples per prompt, DPO steps per batch
    c.rollout = dict(max_new_tokens=32, temperature=0.7, top_k=0, top_p=1.0, stop_token="end", eos_after=0)
    # online: what ranks the samples — a trained RM, or a Python score (the built-in simulated labelers:
    # rlhf_jax.tasks.builtin:labeler_scores; the gold judge: rlhf_jax.tasks.builtin:gold_reward)
    # aggregate: how an RM ensemble's members make one reward (preference.aggregate_rewards): mean | lcb
    # (mean − lcb_coef·std) | min; a single RM is its own mean.
    c.reward = dict(kind="rm", rm_workdir="", function="", weights=(), monitor="", aggregate="mean", lcb_coef=1.0)
    c.batch_size, c.num_steps = 16, 500  # comparisons (online: prompts, each with K samples) per step, steps
    c.optim.update(lr=1e-5, warmup_steps=20, weight_decay=0.0, final_lr_fraction=0.0)
    c.eval_every, c.log_every, c.eval_batches = 250, 25, 0
    c.checkpoint.every = 250

    tiny = preset == "tiny" or preset.endswith("_tiny")
    name = preset.removesuffix("_tiny") if preset not in ("default", "tiny") else "dpo"
    if name == "hh_rlhf":
        # The shared HH-RLHF harmless sample: train on lines [0, 1500), evaluate on [1500, 1800), as configs/rm.py.
        c.data.update(format="hh_rlhf", train_lines=(0, 1500), eval_lines=(1500, 1800), seq_len=256, vocab_size=2000)
        c.model.update(d_model=128, n_layers=2, n_heads=4, max_len=256)
        c.batch_size, c.num_steps = 16, 300
        c.optim.update(lr=3e-4, warmup_steps=30)
        c.eval_every, c.log_every = 100, 25
        name = "dpo"
    if name not in ALGORITHMS:
        raise ConfigError(
            f"configs/dpo.py: unknown preset {preset!r}; use default, tiny, hh_rlhf or one of "
            f"{sorted(ALGORITHMS)} (optionally with _tiny)."
        )
    for group, values in ALGORITHMS[name].items():
        c[group].update(values)
    if tiny:
        # The built-in rule from scratch: the reference is the random initial policy.
        tiny_preset(c, seq_len=48)
        c.data.builtin_examples, c.data.max_prompt_len, c.data.vocab_size = 400, 32, 384
        c.rollout.max_new_tokens = 12
        c.reward.update(kind="function", function="rlhf_jax.rewards:fraction_of_vowels")
        c.num_steps, c.optim.lr, c.checkpoint.every = 40, 1e-3, 20
        c.eval_every, c.log_every, c.eval_batches = 20, 10, 0
    return c
