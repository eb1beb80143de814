"""The config fields every stage shares, the checks that run before anything else, and config composition.

Stage configs in `configs/` start from `base_config()` and add their own
fields; the dict is then locked, so an unknown `--config.x=y` fails at start.
A config built on another (configs/grpo.py on configs/ppo.py, a pipeline's stages) is
`stage_config(name, preset, overrides)`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from rlhf_jax.errors import ConfigError
from rlhf_jax.models.layers import LORA_TARGETS, ROPE_TYPES, ModelConfig
from rlhf_jax.parallel import DEFAULT_RULES

STAGES = ("pretrain", "sft", "rm", "pg", "dpo")
# Config names that changed, old → new. A config, command line or sweep still using an old one fails naming the
# new one (an unknown key would only say that it does not exist).
RENAMED = {"ppo": "pg"}
RENAMED_WHY = "the policy-gradient stage and its block (stage 'pg', config.pg) run PPO, GRPO, RLOO and REINFORCE++"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.seed = 0
    # An earlier stage's workdir or checkpoint dir, or a local Hugging Face model dir: its params start this one.
    c.init_from = ""
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.mesh.rules = [list(r) for r in DEFAULT_RULES]

    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=3e-4,
            schedule="cosine",
            warmup_steps=100,
            total_steps=-1,  # -1: num_steps
            final_lr_fraction=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip_norm=1.0,
        )
    )

    c.batch_size = 32  # global, in sequences (or comparisons / episodes)
    c.grad_accum = 1  # microbatches per step; batch_size must divide by it
    c.num_steps = 1000
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 20  # 0: the whole validation split
    c.progress = True
    # Weights & Biases beside metrics.jsonl and TensorBoard (`pip install wandb`; process 0 only): the same
    # scalars at the same steps, and the config, in one W&B run per workdir: a resumed run goes on in it (its
    # id is kept in <workdir>/wandb_run_id). wandb's own variables apply (WANDB_MODE=offline, WANDB_DIR, ...).
    c.log = ml_collections.ConfigDict(
        dict(
            wandb=False,
            wandb_project="rlhf_jax",
            wandb_entity="",  # empty: your default entity
            wandb_name="",  # empty: the workdir's name
            wandb_group="",  # e.g. a pipeline's or a sweep's name, to gather its runs
            wandb_tags=(),
        )
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, use_async=True))
    # A non-finite loss or gradient never updates the params. "stop": exit naming the step and the last good
    # checkpoint; "skip": count the skipped update, warn and go on.
    c.nonfinite = "stop"
    c.debug_nonfinite_steps = ()  # steps whose loss and gradients are poisoned with NaN (to test the above)
    c.data = ml_collections.ConfigDict(
        dict(
            tokenizer_path="",  # empty: the init_from workdir's tokenizer, else one trained on this stage's text
            tokenizer_type="bpe",  # bpe | unigram | char (when training one)
            vocab_size=512,  # when training one
            # How dialogues become tokens (rlhf_jax/data/chat.py): tags (role ids, this project's tokenizers),
            # hh ("\n\nHuman:" / "\n\nAssistant:" text, any tokenizer), plain (no markers), custom (chat_custom),
            # checkpoint (the model's own Jinja template: "chat_template" in the tokenizer_config.json beside its
            # tokenizer, e.g. from its GGUF; rendered as transformers' apply_chat_template does), chatml (the same
            # with a fixed <|im_start|>role ... <|im_end|> template: SmolLM2, Qwen without their system default).
            chat_template="tags",
            chat_custom=ml_collections.ConfigDict(
                {f"{role}_{part}": "" for role in ("system", "user", "assistant") for part in ("prefix", "suffix")}
                | {"lead": ""}
            ),
            chat_system="",  # a system message put first in dialogues without one (a checkpoint template's default)
        )
    )
    c.model.vocab_size = -1  # -1: from the tokenizer, rounded up to a multiple of 128
    return c


def tiny_preset(c: ml_collections.ConfigDict, seq_len: int) -> ml_collections.ConfigDict:
    """The smoke-test size every stage shares: seconds on CPU, no external files."""
    c.data.seq_len, c.data.vocab_size = seq_len, 384
    c.model.update(d_model=32, n_layers=2, n_heads=2, max_len=64)
    c.batch_size, c.num_steps = 8, 20
    c.optim.warmup_steps = 5
    c.eval_every, c.log_every, c.eval_batches = 10, 5, 2
    c.checkpoint.every = 10
    return c


def renamed_key(dotted: str) -> str | None:
    """The current name of a dotted config key that uses a RENAMED name (e.g. ppo.epochs → pg.epochs), else None."""
    parts = dotted.split(".")
    new = [RENAMED.get(p, p) for p in parts]
    return ".".join(new) if new != parts else None


def check_renamed_flags(argv: list[str]) -> None:
    """Exits naming the new key when a --config.<key> override uses a RENAMED name; run before absl parses
    the flags, whose error would only say that the key does not exist."""
    for arg in argv:
        if arg.startswith("--config."):
            key = arg.removeprefix("--config.").partition("=")[0]
            if renamed_key(key):
                raise SystemExit(f"error: --config.{key} is --config.{renamed_key(key)} now ({RENAMED_WHY}).")


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig(**c.model.to_dict())


def _fail(key: str, why: str, fix: str):
    raise ConfigError(f"config.{key}: {why}. {fix}")


def _check_lora(lora, mlp: str, tied: bool) -> None:
    if lora.rank < 0:
        _fail("model.lora.rank", f"{lora.rank} is negative", "Use 0 (LoRA off) or a rank such as 4, 8 or 16.")
    if lora.rank == 0:
        return
    if lora.alpha <= 0:
        _fail("model.lora.alpha", f"{lora.alpha} must be positive", "Use e.g. alpha = rank (scale 1).")
    targets = tuple(lora.targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        _fail(
            "model.lora.targets",
            f"{unknown or 'none'} {'are' if len(unknown) > 1 else 'is'} not a projection LoRA can adapt",
            f"Use a non-empty subset of {LORA_TARGETS}.",
        )
    if "gate" in targets and mlp != "swiglu":
        _fail(
            "model.lora.targets",
            f"'gate' exists only with model.mlp='swiglu' (this model's is {mlp!r})",
            "Drop 'gate' from the targets.",
        )
    if "lm_head" in targets and tied:
        _fail(
            "model.lora.targets",
            "'lm_head' exists only with untied embeddings (this model ties them)",
            "Set model.tie_embeddings=False (a model trained from scratch) or drop 'lm_head'.",
        )


def validate(c: ml_collections.ConfigDict) -> None:
    """Rejects impossible values with a message naming the key and the fix."""
    for old, new in RENAMED.items():
        if c.stage == old or old in c:
            _fail(
                "stage" if c.stage == old else old,
                f"{old!r} was renamed {new!r} ({RENAMED_WHY})",
                f"Set config.stage={new!r} and rename the config.{old} block config.{new}.",
            )
    if c.stage not in STAGES:
        _fail("stage", f"{c.stage!r} is not a stage", f"Use one of {STAGES}.")
    m = c.model
    if m.d_model % m.n_heads:
        _fail("model.d_model", f"{m.d_model} is not divisible by n_heads={m.n_heads}", "Pick d_model = k * n_heads.")
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        _fail(
            "model.n_kv_heads",
            f"n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}",
            "Use a divisor of n_heads (or 0 for multi-head attention).",
        )
    for key, allowed in (
        ("position", ("learned", "rope")),
        ("norm", ("layernorm", "rmsnorm")),
        ("mlp", ("gelu", "gelu_exact", "swiglu")),
        ("remat", ("none", "full", "dots")),
        ("dtype", ("float32", "bfloat16")),
    ):
        if m[key] not in allowed:
            _fail(f"model.{key}", f"{m[key]!r} is not supported", f"Use one of {allowed}.")
    if not 0.0 < m.rotary_pct <= 1.0:
        _fail("model.rotary_pct", f"{m.rotary_pct} is outside (0, 1]", "Use 1.0 (LLaMA) or e.g. 0.25 (Pythia).")
    if m.position == "rope" and (m.d_model // m.n_heads) * m.rotary_pct < 2:
        _fail(
            "model.rotary_pct",
            f"{m.rotary_pct} rotates fewer than 2 of the {m.d_model // m.n_heads} head dims",
            "Raise rotary_pct or the head size (d_model / n_heads).",
        )
    if m.rope_scaling.rope_type not in ROPE_TYPES:
        _fail(
            "model.rope_scaling.rope_type",
            f"{m.rope_scaling.rope_type!r} is not supported",
            f"Use one of {ROPE_TYPES}.",
        )
    if m.sliding_window < 0:
        _fail("model.sliding_window", f"{m.sliding_window} is negative", "Use 0 (no window) or a window in tokens.")
    _check_lora(m.lora, m.mlp, m.tie_embeddings)
    if not 0.0 <= m.dropout < 1.0:
        _fail("model.dropout", f"{m.dropout} is outside [0, 1)", "Use e.g. 0.0 or 0.1.")
    if c.optim.name not in ("adamw", "adam", "tf_adam"):
        _fail("optim.name", f"{c.optim.name!r} is unknown", "Use adamw, adam or tf_adam.")
    if c.optim.schedule not in ("constant", "cosine", "linear"):
        _fail("optim.schedule", f"{c.optim.schedule!r} is unknown", "Use constant, cosine or linear.")
    if c.optim.lr <= 0:
        _fail("optim.lr", f"{c.optim.lr} must be positive", "Use e.g. 3e-4.")
    for key in ("batch_size", "grad_accum", "num_steps", "log_every", "eval_every"):
        if c[key] <= 0:
            _fail(key, f"{c[key]} must be positive", "Use a positive integer.")
    if c.batch_size % c.grad_accum:
        _fail(
            "batch_size",
            f"{c.batch_size} is not divisible by grad_accum={c.grad_accum}",
            "Make batch_size a multiple of grad_accum.",
        )
    if c.nonfinite not in ("stop", "skip"):
        _fail("nonfinite", f"{c.nonfinite!r} is not supported", "Use 'stop' or 'skip'.")
    if c.checkpoint.every <= 0 or c.checkpoint.keep <= 0:
        _fail("checkpoint", "every and keep must be positive", "Use e.g. every=500, keep=3.")
    if c.init_from and not os.path.exists(c.init_from):
        _fail(
            "init_from",
            f"{c.init_from!r} does not exist",
            "Point it at an earlier stage's --workdir or a local Hugging Face model directory.",
        )
    from rlhf_jax.data import chat

    chat.config_template(c.data)  # an unknown chat_template or chat_custom key fails here, naming the fix


def check_seq_len(c: ml_collections.ConfigDict) -> None:
    """data.seq_len (where a stage has one) fits a learned position table; run once init_from's architecture
    is known (rlhf_jax.run.Run)."""
    seq_len = c.data.get("seq_len")
    if seq_len and c.model.position == "learned" and seq_len > c.model.max_len:
        _fail(
            "data.seq_len",
            f"{seq_len} exceeds model.max_len={c.model.max_len}, the learned position table",
            "Lower data.seq_len (or raise model.max_len when training from scratch).",
        )


def config_module(name: str):
    """configs/<name>.py as a module (the configs directory is not a package: load it by path)."""
    spec = importlib.util.spec_from_file_location(f"rlhf_jax_configs_{name}", os.path.join(CONFIG_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_config(name: str, preset: str, overrides) -> ml_collections.ConfigDict:
    """configs/<name>.py:<preset> with `overrides` (a dict or ConfigDict) merged in; unknown keys are errors."""
    c = config_module(name).get_config(preset)
    merge_config(c, overrides if isinstance(overrides, dict) else overrides.to_dict(), f"config.{c.stage}")
    return c


def merge_config(dst, src: dict, where: str):
    """Sets every (nested) key of `src` in `dst`; a key `dst` lacks is an error naming `where`.key."""
    for k, v in src.items():
        if k not in dst:
            renamed = f" It is {RENAMED[k]} now ({RENAMED_WHY})." if k in RENAMED else ""
            raise ConfigError(f"{where}.{k}: no such field in the {where.split('.')[-1]} stage config.{renamed}")
        if isinstance(v, dict):
            merge_config(dst[k], v, f"{where}.{k}")
        else:
            dst[k] = v
