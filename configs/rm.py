"""Stage 3: reward model on ranked comparisons.

    python -m rlhf_jax.main --config=configs/rm.py:tiny --workdir=runs/rm_tiny
    python -m rlhf_jax.main --config=configs/rm.py --workdir=runs/rm --config.init_from=runs/sft \
        --config.data.train_path=comparisons.jsonl --config.data.format=ranked
    python -m rlhf_jax.main --config=configs/rm.py:hh_rlhf --workdir=runs/rm_hh \
        --config.data.train_path=../shared/data/hh_rlhf_harmless_dev.jsonl.gz

Presets: tiny (the built-in rule, under a minute), default, hh_rlhf (the
shared HH-RLHF sample; compare with scripts/rm_baselines.py), lm_human_preferences
(every algorithmic setting of openai/lm-human-preferences' train_reward.py, the
RM of configs/ppo.py:lm_human_preferences; needs --config.init_from=<SFT workdir>).

Normalisation (rm.normalize_on): comparisons — rewards of the training responses; policy_samples —
rm.normalize_samples fresh samples of the initial policy (init_from) to the prompts of data.prompts_path
(empty: the built-in prompts), drawn with config.rollout as PPO draws them; none. rm.normalize_before also
normalises the fresh reward head on the same reference before training.

Ensembles (Coste et al. 2023): --config.rm.ensemble_size=4 trains 4 RMs in one jitted step (vmapped over a
member axis), each normalised on its own; PPO / online DPO combine them by --config.reward.aggregate=mean|lcb|min.

Formats: ranked {"prompt","responses","ranking"}, pairwise {"prompt","chosen","rejected"}, tldr (OpenAI
summarize-from-feedback comparisons), hh_rlhf {"chosen","rejected"} dialogues. Empty train_path: a built-in synthetic
preference with a known rule (tests, tiny).
"""

from rlhf_jax.config import base_config, tiny_preset
from rlhf_jax.errors import ConfigError


def get_config(preset: str = "default"):
    c = base_config()
    c.stage = "rm"
    c.data.train_path = ""
    c.data.eval_path = ""
    c.data.format = "ranked"  # ranked | pairwise | hh_rlhf | tldr
    c.data.train_lines = ()  # (start, stop): use only these lines of train_path
    c.data.eval_lines = ()  # (start, stop) of eval_path (or of train_path when eval_path is empty)
    c.data.num_responses = 0  # K; 0: the largest K in the file
    c.data.builtin_examples = 2000
    c.data.seq_len = 128  # prompt + response tokens; longer examples are truncated (prompt from the left)
    c.model.update(d_model=128, n_layers=4, n_heads=4, max_len=256)
    # ensemble_size E > 1: E RMs in one vmapped step, member i = the RM of seed + i (each its own reward-head
    # init and data order); bootstrap: each member (or the one RM) trains on a bootstrap resample of the
    # comparisons drawn with its seed.
    c.rm = dict(
        loss="ranking",
        margin=0.0,
        center_coef=0.0,
        normalize_on="comparisons",
        normalize_samples=256,
        normalize_before=False,
        ensemble_size=1,
        bootstrap=False,
    )
    # rm.normalize_on="policy_samples" only: the prompts and sampling settings (keys as in configs/ppo.py).
    c.data.prompts_path, c.data.prompts_format, c.data.prompts_lines, c.data.max_prompt_len = "", "prompt", (), 64
    c.rollout = dict(max_new_tokens=32, temperature=0.7, top_k=0, top_p=1.0, stop_token="end", eos_after=0)
    c.batch_size, c.num_steps = 16, 500
    c.optim.update(lr=1e-4, warmup_steps=20, weight_decay=0.0, final_lr_fraction=0.0)
    c.eval_every, c.log_every, c.eval_batches = 250, 25, 0

    if preset == "tiny":
        # The built-in rule is learnt in a few dozen steps: held-out pairwise accuracy >= 0.95 by step 40
        # (tests/test_rm_stage.py), evaluated on all 200 held-out comparisons (1,200 pairs).
        tiny_preset(c, seq_len=48)
        c.data.builtin_examples = 400
        c.num_steps = 40
        c.optim.lr = 1e-3
        c.eval_every, c.log_every, c.eval_batches = 20, 10, 0
        c.checkpoint.every = 20
    elif preset == "hh_rlhf":
        # The shared HH-RLHF harmless sample: train on lines [0, 1500), evaluate on [1500, 1800).
        # A small RM from scratch, sized to finish in about 10 minutes on 2 CPU cores.
        c.data.format = "hh_rlhf"
        c.data.train_lines, c.data.eval_lines = (0, 1500), (1500, 1800)
        c.data.seq_len, c.data.vocab_size = 256, 2000
        c.model.update(d_model=128, n_layers=2, n_heads=4, max_len=256)
        c.batch_size, c.num_steps = 16, 300
        c.optim.update(lr=3e-4, warmup_steps=30)
        c.eval_every, c.log_every = 100, 25
    elif preset == "lm_human_preferences":
        lm_human_preferences(c)
    elif preset != "default":
        raise ConfigError(
            f"configs/rm.py: unknown preset {preset!r}; use tiny, default, hh_rlhf or lm_human_preferences."
        )
    return c


def lm_human_preferences(c):
    """openai/lm-human-preferences' reward model training (its sentiment / descriptiveness runs), on this
    preset's model and data. Cited as file:line of that repository at commit cbfd210; the sampling settings
    mirror configs/ppo.py:lm_human_preferences so the normalisation sees what PPO will score."""
    c.rm.loss = "best_of_k"  # launch.py:51 labels.type best_of_4: softmax over the K (label_types.py:44-49)
    c.rm.normalize_on = "policy_samples"  # launch.py:53 normalize_after; samples of the policy, train_reward.py:191-199
    c.rm.normalize_before = True  # launch.py:52 normalize_before (train_reward.py:232-234)
    c.rm.normalize_samples = 256  # launch.py:54
    c.rollout.temperature = 0.7  # launch.py:17 policy.temperature (the ref policy samples: train_reward.py:268-273)
    c.rollout.max_new_tokens = 32  # task response_length, launch.py:11 (24 there: see configs/ppo.py deviations)
    c.data.max_prompt_len = 64  # task query_length, launch.py:9
    c.batch_size = 32  # launch.py:61
    c.optim.update(
        name="tf_adam",
        eps=1e-5,
        b1=0.9,
        b2=0.999,  # tf.train.AdamOptimizer(epsilon=1e-5), utils/core.py:627
        grad_clip_norm=0.0,  # none: utils/core.py:621-629 applies the raw (all-reduced) gradients
        weight_decay=0.0,  # plain Adam, utils/core.py:627
        lr=5e-5,  # launch.py:62
        schedule="linear",
        warmup_steps=0,
        final_lr_fraction=0.0,
    )  # (1 - start/num_train)·lr, train_reward.py:249
    # One epoch: each comparison once (train_reward.py:241-250), num_train / batch_size steps.
    c.num_steps = c.data.builtin_examples // c.batch_size
    c.eval_every = c.num_steps
    return c
