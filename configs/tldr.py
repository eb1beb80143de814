"""Recipe: Reddit TL;DR summarization from human feedback (Stiennon et al. 2020), as reproduced by the
N+ implementation details paper (Huang et al. 2024) — SFT on TL;DR → RM on summarize-from-feedback
comparisons → PPO on the TL;DR posts.

Presets <size>_<step>: size tiny | gpt2 | pythia160m, step sft | rm | ppo (the pg stage running PPO). The "plain" chat
template gives the papers' token stream: [bos] "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"
" summary" eos, the post cut at its last newline until the query fits (rlhf_jax/data/tldr.py).
Data are local files (never downloaded): the filtered TL;DR set {"subreddit", "title", "post",
"summary"} (openai/summarize-from-feedback tldr_3_filtered train/valid, JSONL) and the
comparisons {"info", "summaries", "choice"} (the comparisons/batch*.json files concatenated; CNN/DM
records in them are skipped). gpt2 / pythia160m take their architecture and tokenizer from a
local Hugging Face directory given as init_from:

    python -m rlhf_jax.main --config=configs/tldr.py:pythia160m_sft --workdir=runs/tldr_sft \\
        --config.init_from=/models/pythia-160m --config.data.train_path=tldr/train.jsonl \\
        --config.data.eval_path=tldr/valid.jsonl
    python -m rlhf_jax.main --config=configs/tldr.py:pythia160m_rm --workdir=runs/tldr_rm \\
        --config.init_from=runs/tldr_sft --config.data.train_path=tldr/comparisons_train.jsonl \\
        --config.data.eval_path=tldr/comparisons_valid.jsonl
    python -m rlhf_jax.main --config=configs/tldr.py:pythia160m_ppo --workdir=runs/tldr_ppo \\
        --config.init_from=runs/tldr_sft --config.reward.rm_workdir=runs/tldr_rm \\
        --config.data.prompts_path=tldr/train.jsonl
    python -m rlhf_jax.main --config=configs/tldr.py:tiny_sft --workdir=runs/tldr_tiny_sft   # CPU, built-in data

On a pod, run the same command on every host (jax.distributed.initialize finds the coordinator);
batch_size is global. Models of this size are replicated (mesh data=-1); for larger ones add
--config.mesh.fsdp=8 (params and optimizer state sharded over a host's 8 chips, data-parallel
across hosts) and --config.grad_accum / --config.model.remat=full for memory.

Hyperparameters (github.com/vwxyzjn/summarize_from_feedback_details: tldr_dataset.py, sft.py,
reward.py, ppo_left_padding.py and the 8-GPU sbatch files): query 512 tokens, SFT query+response
562 tokens, RM query+response 638 tokens, PPO response 53 tokens; AdamW lr 3e-6, eps 1e-5, no
warmup, one epoch; SFT batch 128 over 116,722 posts, cosine; RM batch 64 over 92,832 comparisons,
cosine; PPO batch 512 episodes, 1 minibatch, 4 epochs, 1M episodes, lr annealed linearly to 0,
fixed KL coefficient 0.05, whitened rewards, score -1 without eos, temperature 0.7, vf_coef 0.1,
clip 0.2 / 0.2, γ = 1, λ = 0.95, critic initialised from the RM. (The original GPT-2 recipe,
openai/lm-human-preferences launch.py: query 500, response 75, PPO lr 2e-6, batch 32, KL 0.03.)
"""

import ml_collections

from rlhf_jax.config import stage_config
from rlhf_jax.errors import ConfigError

SIZES = ("tiny", "gpt2", "pythia160m")
STAGES = ("sft", "rm", "ppo")
SFT_TRAIN, SFT_VALID = "tldr/train.jsonl", "tldr/valid.jsonl"  # replace with your local copies
RM_TRAIN, RM_VALID = "tldr/comparisons_train.jsonl", "tldr/comparisons_valid.jsonl"
# Shapes for a from-scratch run; with init_from a Hugging Face directory, its config.json decides.
MODELS = dict(
    tiny=dict(d_model=32, n_layers=2, n_heads=2, max_len=128),
    gpt2=dict(d_model=768, n_layers=12, n_heads=12, max_len=1024, position="learned", tie_embeddings=True),
    pythia160m=dict(
        d_model=768,
        n_layers=12,
        n_heads=12,
        max_len=2048,
        position="rope",
        rotary_pct=0.25,
        mlp="gelu_exact",
        parallel_residual=True,
        tie_embeddings=False,
    ),
)
EPISODES = 1_000_000


def get_config(preset: str = "pythia160m_sft"):
    size, _, stage = preset.rpartition("_")
    if size not in SIZES or stage not in STAGES:
        raise ConfigError(
            f"configs/tldr.py: unknown preset {preset!r}; use <size>_<stage> with size in {SIZES} "
            f"and stage in {STAGES}, e.g. pythia160m_sft."
        )
    tiny = size == "tiny"
    o = ml_collections.ConfigDict()
    o.data = dict(chat_template="plain")
    adamw = dict(
        name="adamw", lr=1e-3 if tiny else 3e-6, eps=1e-5, warmup_steps=0, final_lr_fraction=0.0, weight_decay=0.0
    )
    if stage == "sft":
        o.data.update(
            format="tldr",
            train_path="" if tiny else SFT_TRAIN,
            eval_path="" if tiny else SFT_VALID,
            seq_len=96 if tiny else 562,
        )
        o.optim = dict(adamw, schedule="cosine")
        o.batch_size, o.num_steps = (8, 20) if tiny else (128, 116_722 // 128)  # one epoch
        o.eval_every, o.eval_batches = (10, 2) if tiny else (250, 50)
    elif stage == "rm":
        o.data.update(
            format="tldr",
            train_path="" if tiny else RM_TRAIN,
            eval_path="" if tiny else RM_VALID,
            seq_len=96 if tiny else 638,
        )
        o.optim = dict(adamw, schedule="cosine")
        o.batch_size, o.num_steps = (8, 20) if tiny else (64, 92_832 // 64)  # one epoch
        o.eval_every, o.eval_batches = (10, 0) if tiny else (500, 50)
    else:
        # 513 = the 512-token query + bos (when the tokenizer has one)
        o.data.update(prompts_format="tldr", prompts_path="" if tiny else SFT_TRAIN, max_prompt_len=48 if tiny else 513)
        o.rollout = dict(max_new_tokens=16 if tiny else 53, temperature=0.7, stop_token="end")  # end: eos under plain
        o.pg = dict(
            epochs=4,
            num_minibatches=1,
            vf_coef=0.1,
            clip_range=0.2,
            clip_range_value=0.2,
            gamma=1.0,
            lam=0.95,
            whiten_rewards=True,
            missing_eos_penalty=-1.0,
            critic="shared" if tiny else "reward_model",
        )
        o.kl = dict(kind="fixed", init_coef=0.05)
        o.optim = dict(adamw, schedule="linear")
        o.batch_size, o.num_steps = (8, 4) if tiny else (512, EPISODES // 512)
        if tiny:  # no RM needed to smoke-test the recipe: a programmatic reward
            o.reward = dict(kind="function", function="rlhf_jax.rewards:fraction_of_vowels")
            o.pg.update(epochs=2, num_minibatches=2)
    o.model = dict(MODELS[size])
    if tiny:
        o.data.vocab_size = 384
        o.checkpoint = dict(every=10)
    return stage_config(stage, "tiny" if tiny else "default", o)
