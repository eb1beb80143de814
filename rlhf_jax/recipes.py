"""The N+ implementation-details PPO recipe (Huang et al. 2024) as a config, for any dataset.

configs/hh_rlhf.py and configs/tldr.py run the same three stages with the same hyperparameters (their
docstrings give the sources); they differ only in data: formats, chat template, paths, sequence lengths,
the dataset sizes that set the one-epoch step counts, and PPO's prompt and response lengths. `recipe`
holds what they share and each file passes its `data`. Presets are <size>_<stage>: size in SIZES (tiny
runs in seconds on a CPU with built-in data), stage in STAGES (ppo is the pg stage running PPO).
"""

import ml_collections

from rlhf_jax.config import stage_config
from rlhf_jax.errors import ConfigError

SIZES = ("tiny", "gpt2", "pythia160m")
STAGES = ("sft", "rm", "ppo")
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


def recipe(preset: str, data: dict, *, where: str, example: str) -> ml_collections.ConfigDict:
    """The config of `preset` (<size>_<stage>) on `data`; `where` (the config file) and `example` (a
    preset) go into the error for an unknown preset.

    data: chat_template; format (the data.format of SFT and RM, PPO's data.prompts_format); sft and rm,
    each dict(train_path, eval_path, seq_len, examples), examples being the training set's size (one
    epoch = examples // batch_size steps); ppo, dict(prompts_path, max_prompt_len, max_new_tokens). The
    tiny presets keep only the format and template: empty paths (built-in data) and short lengths.
    """
    size, _, stage = preset.rpartition("_")
    if size not in SIZES or stage not in STAGES:
        raise ConfigError(
            f"{where}: unknown preset {preset!r}; use <size>_<stage> with size in {SIZES} "
            f"and stage in {STAGES}, e.g. {example}."
        )
    tiny = size == "tiny"
    o = ml_collections.ConfigDict()
    o.data = dict(chat_template=data["chat_template"])
    adamw = dict(
        name="adamw", lr=1e-3 if tiny else 3e-6, eps=1e-5, warmup_steps=0, final_lr_fraction=0.0, weight_decay=0.0
    )
    if stage in ("sft", "rm"):
        d = data[stage]
        o.data.update(
            format=data["format"],
            train_path="" if tiny else d["train_path"],
            eval_path="" if tiny else d["eval_path"],
            seq_len=96 if tiny else d["seq_len"],
        )
        o.optim = dict(adamw, schedule="cosine")
        batch_size = 128 if stage == "sft" else 64
        o.batch_size, o.num_steps = (8, 20) if tiny else (batch_size, d["examples"] // batch_size)  # one epoch
        if stage == "sft":
            o.eval_every, o.eval_batches = (10, 2) if tiny else (250, 50)
        else:
            o.eval_every, o.eval_batches = (10, 0) if tiny else (500, 50)
    else:
        d = data["ppo"]
        o.data.update(
            prompts_format=data["format"],
            prompts_path="" if tiny else d["prompts_path"],
            max_prompt_len=48 if tiny else d["max_prompt_len"],
        )
        # stop at "end", the chat template's end of an answer: eos under both "hh" and "plain"
        o.rollout = dict(max_new_tokens=16 if tiny else d["max_new_tokens"], temperature=0.7, stop_token="end")
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
