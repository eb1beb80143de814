"""Recipes for a real pretrained model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), from its GGUF.

    bash scripts/setup_real.sh && source .venv/bin/activate
    python -m rlhf_jax.convert gguf --out=models/smollm2          # the packaged Q4_1 GGUF → an HF directory
    python -m rlhf_jax.main --config=configs/smollm2.py:rlvr --workdir=runs/smol_rlvr         # GRPO, gold judge
    python -m rlhf_jax.main --config=configs/smollm2.py:sft --workdir=runs/smol_sft
    python -m rlhf_jax.main --config=configs/smollm2.py:dpo --workdir=runs/smol_dpo \\
        --config.init_from=runs/smol_sft --config.data.train_path=comparisons.jsonl
    python -m rlhf_jax.main --config=configs/smollm2.py:hh_rm --workdir=runs/smol_hh_rm \\
        --config.data.train_path=../shared/data/hh_rlhf_harmless_dev.jsonl.gz
    python -m rlhf_jax.main --config=configs/smollm2.py:hh_dpo --workdir=runs/smol_hh_dpo \\
        --config.data.train_path=../shared/data/hh_rlhf_harmless_dev.jsonl.gz

The whole InstructGPT pipeline from this model is configs/pipeline.py:smollm2 (its stages use the sft, rm, ppo
and dpo presets below); GRPO from SmolLM2-Instruct against the gold judge, evaluated per kind, is
scripts/smollm2_rlvr.py (the rlvr preset).

Presets (the built-in task's instructions unless named hh_):
  sft     SFT on the built-in demonstrations (generated into the workdir when data.train_path is empty)
  rm      RM from SmolLM2's trunk on ranked comparisons (data.train_path: e.g. the pipeline's simulated labels)
  ppo     PPO against an RM (reward.rm_workdir), value head on the shared trunk
  grpo    GRPO against an RM (reward.rm_workdir)
  rlvr    GRPO from SmolLM2-Instruct itself, no SFT, the gold judge as a verifiable reward
  dpo     DPO on ranked comparisons (data.train_path)
  hh_rm   RM on the first 1,500 pairs of an HH-RLHF file, evaluated on lines 1,500-1,800 (the shared sample)
  hh_dpo  DPO from SmolLM2-Instruct on the same split

Every preset starts from models/smollm2 (set --config.init_from for another place or an earlier run), renders
dialogues in SmolLM2's own chat template (ChatML with its default system message, as its tokenizer_config.json
says) and trains LoRA adapters (rank 8 on every projection of the 30 blocks; the tied embedding stays frozen),
which keeps the optimizer state at 2.4M parameters and lets PPO / GRPO / DPO use the base model as their
reference without a copy. Compute is bf16 with f32 params. The weights are the GGUF's Q4_1 approximation of the
released bf16 model, dequantised to f32 (rlhf_jax/hf/gguf.py).

Sizes are set for a 2-core CPU (README "Real models" gives each one's time per step); on a pod raise batch_size
and num_steps, shard with --config.mesh.fsdp=<devices per host>, and turn LoRA off with --config.model.lora.rank=0
for full fine-tuning (e.g. a v5e-16: --config.mesh.fsdp=4 --config.batch_size=256).
"""

from rlhf_jax.config import stage_config
from rlhf_jax.errors import ConfigError

SMOLLM2_DIR = "models/smollm2"  # python -m rlhf_jax.convert gguf --out=models/smollm2
CHAT = dict(chat_template="checkpoint")  # its tokenizer_config.json's template: ChatML with its default system turn
LORA = dict(rank=8, alpha=16.0, targets=("query", "key", "value", "out", "gate", "up", "down"))
HH_TRAIN, HH_EVAL = (0, 1500), (1500, 1800)
PRESETS = ("sft", "rm", "ppo", "grpo", "rlvr", "dpo", "hh_rm", "hh_dpo")
GOLD = "rlhf_jax.tasks.builtin:gold_reward"
# GRPO's settings (configs/grpo.py ALGORITHMS["grpo"]) with 4 prompts x 4 samples per iteration.
_PG = dict(
    rollout=dict(max_new_tokens=32, temperature=0.7, samples_per_prompt=4),
    batch_size=16,
    data=dict(max_prompt_len=64),
    optim=dict(lr=2e-5),
    log_every=1,
    sample_every=10,
)


def get_config(preset: str = "rlvr"):
    if preset not in PRESETS:
        raise ConfigError(f"configs/smollm2.py: unknown preset {preset!r}; use one of {PRESETS}.")
    common = dict(init_from=SMOLLM2_DIR, model=dict(lora=LORA), data=dict(CHAT), checkpoint=dict(every=25))
    adamw = dict(name="adamw", lr=1e-4, warmup_steps=5, weight_decay=0.0, final_lr_fraction=0.0, schedule="cosine")
    # SFT, RM and DPO: 8 sequences (comparisons) per step; an HH run is one epoch of its 1,500 pairs.
    steps = dict(num_steps=188, eval_every=94) if preset.startswith("hh_") else dict(num_steps=100, eval_every=50)
    supervised = dict(batch_size=8, optim=adamw, eval_batches=0, log_every=10, **steps)
    # HH dialogues cut to their last 128 tokens (prompt cut from the left): the turns the pair differs in
    pairs = (
        dict(format="hh_rlhf", train_lines=HH_TRAIN, eval_lines=HH_EVAL, seq_len=128)
        if preset.startswith("hh_")
        else dict(format="ranked", seq_len=96)
    )
    if preset == "sft":
        file, o = "sft", dict(supervised, data=dict(seq_len=96, builtin_examples=1000), eval_batches=4)
    elif preset in ("rm", "hh_rm"):
        file, o = "rm", dict(supervised, data=pairs)
    elif preset in ("dpo", "hh_dpo"):
        file, o = "dpo", dict(supervised, data=dict(pairs, max_prompt_len=64), optim=dict(adamw, lr=2e-5))
    elif preset == "ppo":
        file = "ppo"
        o = dict(
            _PG,
            rollout=dict(_PG["rollout"], samples_per_prompt=1),
            num_steps=50,
            pg=dict(epochs=2, num_minibatches=2),
            kl=dict(kind="fixed", init_coef=0.05),
        )
    else:  # grpo against an RM, or rlvr against the gold judge
        file = "grpo"
        o = dict(_PG, num_steps=50)
        if preset == "rlvr":
            o["reward"] = dict(kind="function", function=GOLD)
    return stage_config(file, "default", _deep_merge(common, o))


def _deep_merge(a: dict, b: dict) -> dict:
    """`a` with `b` on top, nested dicts merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
