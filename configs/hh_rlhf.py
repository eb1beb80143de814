"""Recipe: Anthropic HH-RLHF (Bai et al. 2022) — SFT on the chosen dialogues → RM on the pairs → PPO on the prompts.

Presets <size>_<step>: size tiny | gpt2 | pythia160m, step sft | rm | ppo (the pg stage running PPO). Every
step renders dialogues with the "hh" chat template ("\\n\\nHuman: ..." / "\\n\\nAssistant: ..." text, eos ends an
answer), so a GPT-2 or Pythia tokenizer needs no new tokens. The data are the local JSONL(.gz)
files of github.com/anthropics/hh-rlhf (the four train subsets concatenated: 160,800 dialogues;
test: 8,552), never downloaded. gpt2 / pythia160m take their architecture and tokenizer from a
local Hugging Face directory given as init_from (GPT-2-124M or Pythia-160M); later stages start
from the earlier stage's workdir:

    python -m rlhf_jax.main --config=configs/hh_rlhf.py:gpt2_sft --workdir=runs/hh_sft \\
        --config.init_from=/models/gpt2 --config.data.train_path=hh-rlhf/train.jsonl.gz \\
        --config.data.eval_path=hh-rlhf/test.jsonl.gz
    python -m rlhf_jax.main --config=configs/hh_rlhf.py:gpt2_rm --workdir=runs/hh_rm \\
        --config.init_from=runs/hh_sft --config.data.train_path=hh-rlhf/train.jsonl.gz \\
        --config.data.eval_path=hh-rlhf/test.jsonl.gz
    python -m rlhf_jax.main --config=configs/hh_rlhf.py:gpt2_ppo --workdir=runs/hh_ppo \\
        --config.init_from=runs/hh_sft --config.reward.rm_workdir=runs/hh_rm \\
        --config.data.prompts_path=hh-rlhf/train.jsonl.gz
    python -m rlhf_jax.main --config=configs/hh_rlhf.py:tiny_sft --workdir=runs/hh_tiny_sft   # seconds, CPU

On a pod, run the same command on every host (jax.distributed.initialize finds the TPU or SLURM
coordinator); batch_size is global and each host loads only its slice. Models of this size are
replicated: mesh data=-1 (all devices data-parallel) is the default. For larger models shard the
params and optimizer state over a host's devices, e.g. --config.mesh.fsdp=8 (mesh data=-1, fsdp=8,
tensor=1: 4 hosts × 8 chips = data 4 × fsdp 8), and lower memory with --config.grad_accum=4 or
--config.model.remat=full.

Hyperparameters (N+ implementation details paper, Huang et al. 2024, github.com/vwxyzjn/
summarize_from_feedback_details — the closest published PPO recipe for Pythia-160M..6.9B; its
reward.py/sft.py/ppo_left_padding.py defaults with the 8-GPU sbatch settings): AdamW lr 3e-6,
eps 1e-5, no warmup, one epoch; SFT batch 128 (16 accumulation × 8 GPUs), cosine; RM batch 64
(8 × 8), cosine; PPO batch 512 episodes (64 × 8), 1 minibatch, 4 epochs, lr annealed linearly
to 0, 1M episodes, fixed KL coefficient 0.05, whitened rewards, score -1 for a response without
eos, temperature 0.7, vf_coef 0.1, clip 0.2 / 0.2, γ = 1, λ = 0.95, the critic initialised from
the RM. Lengths for HH's long dialogues follow the DPO recipe on HH (Rafailov et al. 2023,
eric-mitchell/direct-preference-optimization config.yaml: max_length 512, max_prompt_length 256);
the 128-token PPO response is this recipe's choice.
"""

import ml_collections

from rlhf_jax.config import stage_config
from rlhf_jax.errors import ConfigError

SIZES = ("tiny", "gpt2", "pythia160m")
STAGES = ("sft", "rm", "ppo")
TRAIN, TEST = "hh-rlhf/train.jsonl.gz", "hh-rlhf/test.jsonl.gz"  # replace with your local copies
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


def get_config(preset: str = "gpt2_sft"):
    size, _, stage = preset.rpartition("_")
    if size not in SIZES or stage not in STAGES:
        raise ConfigError(
            f"configs/hh_rlhf.py: unknown preset {preset!r}; use <size>_<stage> with size in {SIZES} "
            f"and stage in {STAGES}, e.g. gpt2_sft."
        )
    tiny = size == "tiny"
    o = ml_collections.ConfigDict()
    o.data = dict(chat_template="hh")
    adamw = dict(
        name="adamw", lr=1e-3 if tiny else 3e-6, eps=1e-5, warmup_steps=0, final_lr_fraction=0.0, weight_decay=0.0
    )
    if stage == "sft":
        o.data.update(
            format="hh_rlhf",
            train_path="" if tiny else TRAIN,
            eval_path="" if tiny else TEST,
            seq_len=96 if tiny else 512,
        )
        o.optim = dict(adamw, schedule="cosine")
        o.batch_size, o.num_steps = (8, 20) if tiny else (128, 160_800 // 128)  # one epoch
        o.eval_every, o.eval_batches = (10, 2) if tiny else (250, 50)
    elif stage == "rm":
        o.data.update(
            format="hh_rlhf",
            train_path="" if tiny else TRAIN,
            eval_path="" if tiny else TEST,
            seq_len=96 if tiny else 512,
        )
        o.optim = dict(adamw, schedule="cosine")
        o.batch_size, o.num_steps = (8, 20) if tiny else (64, 160_800 // 64)  # one epoch
        o.eval_every, o.eval_batches = (10, 0) if tiny else (500, 50)
    else:
        o.data.update(prompts_format="hh_rlhf", prompts_path="" if tiny else TRAIN, max_prompt_len=48 if tiny else 256)
        o.rollout = dict(max_new_tokens=16 if tiny else 128, temperature=0.7, stop_token="end")  # end: eos under hh
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
