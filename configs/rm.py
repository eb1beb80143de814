"""Stage 3: reward model on ranked comparisons.

    python -m rlhf_jax.main --config=configs/rm.py:tiny --workdir=runs/rm_tiny
    python -m rlhf_jax.main --config=configs/rm.py --workdir=runs/rm --config.init_from=runs/sft \
        --config.data.train_path=comparisons.jsonl --config.data.format=ranked
    python -m rlhf_jax.main --config=configs/rm.py:hh_rlhf --workdir=runs/rm_hh \
        --config.data.train_path=../shared/data/hh_rlhf_harmless_dev.jsonl.gz

Presets: tiny (the built-in rule, under a minute), default, hh_rlhf (the
shared HH-RLHF sample; compare with scripts/rm_baselines.py).

Formats: ranked {"prompt","responses","ranking"}, pairwise {"prompt","chosen","rejected"}, tldr (OpenAI
summarize-from-feedback comparisons), hh_rlhf {"chosen","rejected"} dialogues. Empty train_path: a built-in synthetic
preference with a known rule (tests, tiny).
"""

from rlhf_jax.config import base_config, tiny_preset


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
    c.rm = dict(loss="ranking", margin=0.0, center_coef=0.0, normalize_on="comparisons")
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
    elif preset != "default":
        raise ValueError(f"configs/rm.py: unknown preset {preset!r}; use tiny, default or hh_rlhf.")
    return c
