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

from rlhf_jax.recipes import SIZES, STAGES, recipe  # noqa: F401  (SIZES, STAGES: the presets, for callers)

TRAIN, TEST = "hh-rlhf/train.jsonl.gz", "hh-rlhf/test.jsonl.gz"  # replace with your local copies
# SFT trains on the chosen dialogues of these files and the RM on their pairs: one set of paths and lengths
DIALOGUES = dict(train_path=TRAIN, eval_path=TEST, seq_len=512, examples=160_800)
DATA = dict(
    chat_template="hh",  # PPO stops at the template's "end": eos under hh
    format="hh_rlhf",
    sft=DIALOGUES,
    rm=DIALOGUES,
    ppo=dict(prompts_path=TRAIN, max_prompt_len=256, max_new_tokens=128),
)


def get_config(preset: str = "gpt2_sft"):
    return recipe(preset, DATA, where="configs/hh_rlhf.py", example="gpt2_sft")
