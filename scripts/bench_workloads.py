"""rlhf_jax's side of scripts/bench.py: the shapes both systems run and our workloads, each built in a worker
process (scripts/bench_harness.py). A workload's builder returns `run()`, one unit of timed work, or (a whole
stage: PPO, GRPO) runs it and returns its metrics. JAX is imported inside the functions, so the PyTorch worker
(scripts/bench_torch.py), which reads the shapes from here, never loads it.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable

from bench_harness import ROOT

# GPT-2-like shape: d_model >= 512 so the MFU figure is about matmuls, not overheads.
FULL = dict(
    train=dict(vocab=8192, d_model=512, n_layers=8, n_heads=8, seq_len=256, batch=8),
    generate=dict(
        vocab=8192, d_model=512, n_layers=8, n_heads=8, batch=64, prompt_len=16, new_tokens=64, temperature=0.7
    ),
    ppo=dict(d_model=128, n_layers=4, n_heads=4, batch=64, new_tokens=32, iterations=7),
    grpo=dict(
        d_model=128,
        n_layers=4,
        n_heads=4,
        max_len=128,
        vocab=2048,
        batch=64,
        group=8,
        max_prompt_len=32,
        new_tokens=32,
        temperature=0.7,
        beta=0.04,
        lr=1e-5,
        iterations=8,
    ),
)
# One layer: XLA's compile time grows with depth, and --quick only checks that everything runs.
QUICK = dict(
    train=dict(vocab=256, d_model=64, n_layers=1, n_heads=2, seq_len=32, batch=4),
    generate=dict(vocab=256, d_model=64, n_layers=1, n_heads=2, batch=8, prompt_len=8, new_tokens=8, temperature=0.7),
    ppo=dict(d_model=32, n_layers=1, n_heads=2, batch=8, new_tokens=8, iterations=3),
    grpo=dict(
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_len=64,
        vocab=384,
        batch=8,
        group=4,
        max_prompt_len=24,
        new_tokens=8,
        temperature=0.7,
        beta=0.04,
        lr=1e-5,
        iterations=3,
    ),
)
GRPO_WARMUP = 2  # iterations left out of the median: the first compiles (ours) or warms the allocator (torch)
OPTIM = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
DTYPES = ("bfloat16", "float32")


def jax_model(s: dict, dtype: str, max_len: int):
    from rlhf_jax.models.gpt import TransformerLM
    from rlhf_jax.models.layers import ModelConfig

    return TransformerLM(
        ModelConfig(
            vocab_size=s["vocab"],
            d_model=s["d_model"],
            n_layers=s["n_layers"],
            n_heads=s["n_heads"],
            max_len=max_len,
            dtype=dtype,
        )
    )


def tokens_for(s: dict, shape: tuple[int, int]):
    """The same int32 token ids in both systems (ids 4.. avoid the special tokens)."""
    import numpy as np

    return np.random.default_rng(0).integers(4, s["vocab"], shape).astype(np.int32)


def jax_train(spec: dict) -> Callable[[], None]:
    import jax
    import ml_collections
    import numpy as np

    from rlhf_jax import optim, parallel, train_state
    from rlhf_jax.stages.lm import make_train_step

    s = spec["shape"]
    model = jax_model(s, spec["dtype"], s["seq_len"])
    ocfg = ml_collections.ConfigDict(
        dict(name="adamw", schedule="constant", warmup_steps=0, total_steps=-1, final_lr_fraction=1.0, **OPTIM)
    )
    tx, schedule = optim.make_optimizer(ocfg)
    mesh, rules = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]), parallel.DEFAULT_RULES
    state, sh = train_state.create(train_state.model_init_fn(model, s["seq_len"], 0), tx, mesh, rules, seed=0)
    tokens = tokens_for(s, (s["batch"], s["seq_len"] + 1))
    local = {"tokens": tokens, "input_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
    with parallel.activate(mesh, rules):
        step = jax.jit(
            make_train_step(model, tx, schedule, 1),
            in_shardings=(sh, parallel.batch_sharding(mesh, rules)),
            out_shardings=(sh, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )
        batch = parallel.global_batch(local, mesh, rules)
    box = {"state": state}

    def run():
        with parallel.activate(mesh, rules):
            box["state"], metrics = step(box["state"], batch)
        loss = float(metrics["train/loss"])  # a host sync: the step has finished
        if not np.isfinite(loss):
            raise FloatingPointError(f"train step loss is {loss}")

    return run


def jax_generate(spec: dict) -> Callable[[], None]:
    import flax.linen as nn
    import jax

    from rlhf_jax import train_state
    from rlhf_jax.sampling import SamplingSettings, sample

    s = spec["shape"]
    B, P, N = s["batch"], s["prompt_len"], s["new_tokens"]
    model = jax_model(s, spec["dtype"], P + N)
    params = nn.meta.unbox(jax.jit(train_state.model_init_fn(model, P, 0, heads=("lm",)))())
    # eos = the last id: EOS ends a sample's *mask*, never the loop, so every run decodes N steps.
    settings = SamplingSettings(
        max_new_tokens=N, temperature=s["temperature"], top_k=0, top_p=1.0, eos_id=s["vocab"] - 1, pad_id=0
    )
    fn = jax.jit(functools.partial(sample, model=model, settings=settings))
    prompt = jax.numpy.asarray(tokens_for(s, (B, P)))
    mask = jax.numpy.ones((B, P), jax.numpy.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(0), B))

    def run():
        out = jax.device_get(fn(params, prompt, mask, keys)["tokens"])
        assert out.shape == (B, N), out.shape

    return run


def jax_peak() -> dict:
    """{dtype: FLOP/s} with rlhf_jax.perf.measured_peak_flops (f32 accumulation)."""
    from rlhf_jax import perf

    return {dt: perf.measured_peak_flops(dt) for dt in DTYPES}


def jax_ppo(spec: dict) -> dict:
    """Runs the PPO stage (configs/ppo.py:tiny, resized) and returns its per-iteration `time/*` metrics."""
    sys.path.insert(0, ROOT)
    import configs.ppo as ppo_cfg
    from rlhf_jax.metrics import read_metrics
    from rlhf_jax.stages import pg

    s = spec["shape"]
    c = ppo_cfg.get_config("tiny")
    c.progress = False
    c.model.update(d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_len=128)
    c.rollout.max_new_tokens = s["new_tokens"]
    c.batch_size, c.num_steps = s["batch"], s["iterations"]
    if s["batch"] >= 16:  # lm-human-preferences' 4 epochs x 4 minibatches, once minibatches are not tiny
        c.pg.update(epochs=4, num_minibatches=4)
    c.checkpoint.every, c.sample_every, c.log_every = 10**6, 0, 1  # checkpoint once, at the end
    with tempfile.TemporaryDirectory() as workdir:
        pg.train_and_evaluate(c, workdir)
        rows = read_metrics(workdir)
    keys = (
        "time/generate_s",
        "time/score_s",
        "time/update_s",
        "perf/episodes_per_sec",
        "perf/rollout_tokens_per_sec",
        "time/generate_frac",
    )
    return {
        "iterations": [{k: r[k] for k in keys} for r in rows],
        "config": {
            "model": c.model.to_dict(),
            "batch_size": c.batch_size,
            "max_prompt_len": c.data.max_prompt_len,
            "max_new_tokens": c.rollout.max_new_tokens,
            "epochs": c.pg.epochs,
            "num_minibatches": c.pg.num_minibatches,
            "reward": c.reward.function,
        },
    }


def grpo_inputs(directory: str, s: dict) -> dict:
    """What both GRPO runs read: a byte-level BPE tokenizer.json trained on the built-in corpus (with
    <pad>, </s>, <s>), and 512 built-in instructions as {"prompt"} lines."""
    import json as _json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, ROOT)
    from rlhf_jax.tasks import builtin, builtin_text

    corpus, prompts = os.path.join(directory, "corpus.txt"), os.path.join(directory, "prompts.jsonl")
    builtin_text.write_builtin_corpus(corpus, num_chars=200_000, seed=0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train(
        [corpus],
        trainers.BpeTrainer(
            vocab_size=s["vocab"],
            special_tokens=["<pad>", "</s>", "<s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        _json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    builtin.write_prompts(os.path.join(directory, "chat_prompts.jsonl"), 512, seed=0)
    with open(os.path.join(directory, "chat_prompts.jsonl")) as f, open(prompts, "w") as out:
        for line in f:
            out.write(_json.dumps({"prompt": _json.loads(line)["messages"][-1]["content"]}) + "\n")
    return {"tokenizer": path, "prompts": prompts}


def jax_grpo(spec: dict) -> dict:
    """The policy-gradient stage as configs/grpo.py sets it, resized to the benchmark's shape and inputs;
    returns every iteration's `time/*` metrics."""
    sys.path.insert(0, ROOT)
    from rlhf_jax.config import stage_config
    from rlhf_jax.metrics import read_metrics
    from rlhf_jax.stages import pg

    s, inputs = spec["shape"], spec["inputs"]
    c = stage_config("grpo", "tiny", {})
    c.progress = False
    c.model.update(
        d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_len=s["max_len"], vocab_size=-1
    )
    c.data.update(
        tokenizer_path=inputs["tokenizer"],
        prompts_path=inputs["prompts"],
        chat_template="plain",
        max_prompt_len=s["max_prompt_len"],
    )
    c.rollout.update(
        max_new_tokens=s["new_tokens"], samples_per_prompt=s["group"], temperature=s["temperature"], stop_token="eos"
    )
    c.kl.init_coef, c.optim.lr, c.optim.schedule = s["beta"], s["lr"], "constant"
    c.batch_size, c.num_steps = s["batch"], s["iterations"]
    c.checkpoint.every, c.sample_every, c.log_every = 10**6, 0, 1  # checkpoint once, at the end
    with tempfile.TemporaryDirectory() as workdir:
        pg.train_and_evaluate(c, workdir)
        rows = read_metrics(workdir)
    keys = ("time/generate_s", "time/score_s", "time/update_s", "perf/episodes_per_sec")
    return {"iterations": [{k: r[k] for k in keys} for r in rows]}
