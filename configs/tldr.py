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

from rlhf_jax.recipes import SIZES, STAGES, recipe  # noqa: F401  (SIZES, STAGES: the presets, for callers)

SFT_TRAIN, SFT_VALID = "tldr/train.jsonl", "tldr/valid.jsonl"  # replace with your local copies
RM_TRAIN, RM_VALID = "tldr/comparisons_train.jsonl", "tldr/comparisons_valid.jsonl"
DATA = dict(
    chat_template="plain",  # PPO stops at the template's "end": eos under plain
    format="tldr",
    sft=dict(train_path=SFT_TRAIN, eval_path=SFT_VALID, seq_len=562, examples=116_722),
    rm=dict(train_path=RM_TRAIN, eval_path=RM_VALID, seq_len=638, examples=92_832),
    # 513 = the 512-token query + bos (when the tokenizer has one)
    ppo=dict(prompts_path=SFT_TRAIN, max_prompt_len=513, max_new_tokens=53),
)


def get_config(preset: str = "pythia160m_sft"):
    return recipe(preset, DATA, where="configs/tldr.py", example="pythia160m_sft")
