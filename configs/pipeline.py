"""The main job: pretrain → SFT → K samples → simulated labelers → RM → PPO → evaluation, offline.

    python -m rlhf_jax.pipeline --config=configs/pipeline.py:tiny --workdir=runs/pipeline_tiny
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --workdir=runs/quickstart   # = quickstart.sh
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --workdir=runs/grpo \
        --config.policy=grpo --config.reuse_from=runs/quickstart     # the same SFT and RM, GRPO instead of PPO

config.<stage> is the whole configs/<stage>.py:<preset> (config.pg: configs/ppo.py's) with the overrides below
applied, so every stage key can be set on the command line or in a sweep, e.g. --config.pg.num_steps=100,
--config.pg.kl.init_coef=0.05 or --config.data.labeler_noise=0.3.
"""

import ml_collections

from rlhf_jax.config import config_module, stage_config
from rlhf_jax.errors import ConfigError
from rlhf_jax.tasks.instructions import SYSTEM_PROMPT as TASK_SYSTEM


def get_config(preset: str = "default"):
    if preset not in ("default", "tiny", "smollm2"):
        raise ConfigError(f"configs/pipeline.py: unknown preset {preset!r}; use tiny, default or smollm2.")
    if preset == "smollm2":
        return smollm2_config()
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.preset = preset
    # A pretrained model (a local Hugging Face directory, e.g. models/smollm2) that replaces the pretrain stage:
    # SFT starts from it and its prompted rows are the "GPT" rows. Empty: pretrain on the built-in corpus.
    c.pretrained = ""
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # The policy stage's algorithm: any name a configs/<file>.py's ALGORITHMS declares (rlhf_jax.algorithms),
    # e.g. ppo | grpo | dr_grpo | rloo | reinforce_pp | dapo | gspo | cispo (config.pg, the policy-gradient stage
    # of configs/ppo.py) or dpo | ipo | simpo | plackett_luce | online_dpo (config.dpo). Its settings come from
    # that ALGORITHMS entry; the sizes (steps, batch, lengths, lr) from config.pg / config.dpo below, and any
    # key of theirs set on the command line wins over both.
    c.policy = "ppo"
    # The policy stage's reward: "rm" (the recipe: the RM trained on the simulated rankings) or "gold" (the
    # gold judge itself: the ceiling a perfect RM would give, for ablations)
    c.policy_reward = "rm"
    # A finished pipeline workdir whose stages this run may use instead of running them again: a stage
    # is taken from there when its config and every upstream stage's config equal this run's (see
    # rlhf_jax.pipeline.REUSE_KEYS). Ablations over PPO or RM settings share one pretrain/SFT this way.
    c.reuse_from = ""
    c.data = dict(
        corpus_chars=60_000 if tiny else 2_500_000,
        num_demos=400 if tiny else 6000,
        demo_error_rate=0.2,  # noisy demonstrator: slips a rater finds only by solving the instruction
        # share of its slips that insert a FORBIDDEN word: 10% of demonstrations, so SFT inherits a
        # harmful rate that RLHF can be measured to lower (with the demonstrator's default 0.15, SFT's
        # harmful rate at temperature 0.7 was 0.0-1.0% on 300 prompts: too rare to compare)
        demo_forbidden_prob=0.5,
        # share of demonstrations that end with chatter ("42 is the answer") although the task asks for the
        # result only: a habit a rater sees at a glance, which SFT imitates and the preference signal removes.
        # Measured on seed 0 (experiments/chatter.py): with no chatter PPO ties SFT (win 0.502); at 0.7, 0.693
        demo_chatter_rate=0.7,
        # prompts ranked by the simulated labelers. Measured on one SFT model (seed 0), RM accuracy against
        # the gold judge on 518 held-out pairs: 1000 prompts 0.575, 3000 0.631, 6000 0.651 (RM 400 steps)
        num_rm_prompts=64 if tiny else 3000,
        num_rm_eval_prompts=32 if tiny else 200,  # held-out pairs labelled by the gold judge
        num_ppo_prompts=128 if tiny else 2000,
        num_eval_prompts=32 if tiny else 300,
        k=4,  # responses per prompt for the labelers (InstructGPT: 4 to 9)
        labeler_noise=0.65,  # ≈ 75% agreement with gold (InstructGPT labelers: ≈ 73%)
        sample_temperature=1.0,
        max_prompt_len=64 if tiny else 32,  # rendered default prompts are at most 28 tokens: no padding to pay for
        kinds=("copy", "reverse", "sort", "add", "subtract", "count", "first", "last"),
        # the chat template (rlhf_jax/data/chat.py) every stage and the evaluation render dialogues in, and the
        # system message put first in dialogues without one
        chat_template="tags",
        chat_system="",
    )
    # few_shot: solved training instances before each held-out instruction for the pretrained model's prompted row
    c.eval = dict(
        temperature=0.7, max_new_tokens=16 if tiny else 24, best_of_n=4, batch_size=32 if tiny else 100, few_shot=2
    )

    model = (
        dict(d_model=32, n_layers=2, n_heads=2, max_len=128)
        if tiny
        else dict(d_model=128, n_layers=4, n_heads=4, max_len=256)
    )
    c.pretrain = dict(
        model=model,
        num_steps=30 if tiny else 600,
        batch_size=16 if tiny else 32,
        data=dict(seq_len=64 if tiny else 128, vocab_size=384 if tiny else 512),
        eval_every=30 if tiny else 300,
        checkpoint=dict(every=30 if tiny else 300),
    )
    # SFT at lr 1e-3 on 64-token windows (configs/sft.py: 3e-4, 128): held-out loss 0.62 after 2,000 steps.
    # About 5% of demonstrations (two-turn chats, context questions) exceed 64 tokens and are cut at the end.
    c.sft = dict(
        num_steps=30 if tiny else 2000,
        batch_size=16 if tiny else 32,
        optim=dict(lr=1e-3),
        data=dict(seq_len=96 if tiny else 64),
        eval_every=30 if tiny else 500,
        checkpoint=dict(every=30 if tiny else 500),
    )
    c.rm = dict(
        num_steps=30 if tiny else 400,
        batch_size=16,
        data=dict(seq_len=96 if tiny else 64),  # longest: 52
        eval_every=30 if tiny else 200,
        eval_batches=0,
        checkpoint=dict(every=30 if tiny else 200),
    )
    # tiny: 4 iterations, where each new prompt width (16, 32, 64 with length buckets) compiles the rollout, the
    # scoring and the update again, so every batch pads to max_prompt_len (a GRPO stage: 21-25 s -> 13 s of CPU)
    c.pg = dict(
        num_steps=4 if tiny else 80,
        batch_size=16 if tiny else 64,
        data=dict(max_prompt_len=64 if tiny else 32),
        rollout=dict(max_new_tokens=16 if tiny else 24, temperature=0.7, length_bucket=0 if tiny else 16),
        optim=dict(lr=1e-4 if tiny else 3e-5),
        checkpoint=dict(every=4 if tiny else 20),
    )
    # DPO on the RM's comparisons (3,000 ranked prompts x K = 4), as many steps and comparisons per step as the
    # RM; online DPO the same steps of 16 prompts x 2 samples of its own, sampled as PPO samples.
    c.dpo = dict(
        num_steps=30 if tiny else 400,
        batch_size=16,
        data=dict(seq_len=96 if tiny else 64, max_prompt_len=64 if tiny else 32, length_bucket=0 if tiny else 16),
        rollout=dict(max_new_tokens=16 if tiny else 24, temperature=0.7),
        optim=dict(lr=1e-4 if tiny else 3e-5),
        eval_every=30 if tiny else 200,
        checkpoint=dict(every=30 if tiny else 200),
    )
    for name, file in (("pretrain", "pretrain"), ("sft", "sft"), ("rm", "rm"), ("pg", "ppo"), ("dpo", "dpo")):
        c[name] = stage_config(file, preset, c[name])
    return c


def smollm2_config():
    """The recipe on a real pretrained model: SmolLM2-135M-Instruct (configs/smollm2.py) replaces the pretrain
    stage, every stage trains LoRA adapters (rank 8, every projection) and renders the task in ChatML with the
    task's own system message. Sized for one seed in about an hour on a 2-core CPU (README "Real models"):
    1,000 demonstrations, 300 ranked prompts (K = 4), 200 held-out prompts, 100 SFT / RM / DPO steps of 8,
    30 policy-gradient iterations of 16 episodes.

        python -m rlhf_jax.convert gguf --out=models/smollm2
        python -m rlhf_jax.pipeline --config=configs/pipeline.py:smollm2 --workdir=runs/smol_pipeline
    """
    smol = config_module("smollm2")
    c = get_config("default")
    c.preset = "smollm2"
    c.pretrained = smol.SMOLLM2_DIR
    chat = dict(chat_template="chatml", chat_system=TASK_SYSTEM)
    c.data.update(
        dict(num_demos=1000, num_rm_prompts=300, num_rm_eval_prompts=100, num_ppo_prompts=500, num_eval_prompts=200)
    )
    c.data.max_prompt_len = 48  # the task's system turn + the longest non-context instruction: 44 tokens
    c.data.update(chat)
    c.eval.batch_size = 50
    # SFT / RM / policy / DPO: configs/smollm2.py's presets (LoRA, their lr and sizes) in the task's chat format
    for name, preset in (("sft", "sft"), ("rm", "rm"), ("pg", "ppo"), ("dpo", "dpo")):
        stage = smol.get_config(preset)
        stage.init_from = ""  # the pipeline wires each stage to the one before it
        stage.data.update(chat)
        c[name] = stage
    c.sft.data.update(dict(seq_len=64))
    c.rm.data.update(dict(seq_len=72))
    c.dpo.data.update(dict(seq_len=72, max_prompt_len=48))
    c.pg.data.update(dict(max_prompt_len=48))
    c.pg.rollout.update(dict(max_new_tokens=24))
    c.pg.num_steps = 30
    # One learning rate for every LoRA stage (configs/smollm2.py's SFT / RM lr), untuned: the head-to-head's
    # equal tuning budget here is none for any algorithm. (The presets' 2e-5 for PPO / GRPO / DPO barely moved
    # the adapters in their budget: HH DPO's implicit-reward accuracy 0.545 after half an epoch.)
    c.pg.optim.lr = c.dpo.optim.lr = c.sft.optim.lr
    return c
