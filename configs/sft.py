"""Stage 2: supervised fine-tuning on demonstrations (loss on response tokens only).

    python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=runs/sft_tiny
    python -m rlhf_jax.main --config=configs/sft.py --workdir=runs/sft --config.init_from=runs/pretrain

Data (data.format): chat {"prompt", "response"} or {"messages": [{"role", "content"}, ...]};
hh_rlhf (the chosen dialogues of HH-RLHF); tldr {"subreddit", "title", "post", "summary"}.
Empty paths use the built-in demonstrations, generated into the workdir. Recipes on public
data: configs/hh_rlhf.py, configs/tldr.py.
"""

from rlhf_jax.config import base_config, tiny_preset
from rlhf_jax.errors import ConfigError


def get_config(preset: str = "default"):
    c = base_config()
    c.stage = "sft"
    c.data.train_path = ""
    c.data.eval_path = ""
    c.data.format = "chat"  # chat | hh_rlhf | tldr
    c.data.train_lines = ()  # (start, stop): use only these lines of train_path
    c.data.eval_lines = ()  # (start, stop) of eval_path (or of train_path when eval_path is empty)
    c.data.builtin_examples = 4000
    c.data.seq_len = 128
    c.batch_size, c.num_steps = 32, 1000
    c.optim.update(lr=3e-4, warmup_steps=50, weight_decay=0.0, final_lr_fraction=0.0)
    c.eval_every, c.log_every = 250, 50

    if preset == "tiny":
        tiny_preset(c, seq_len=48)
        c.data.builtin_examples = 200
    elif preset != "default":
        raise ConfigError(f"configs/sft.py: unknown preset {preset!r}; use tiny or default.")
    return c
