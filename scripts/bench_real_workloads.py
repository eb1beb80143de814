"""The real-model side by side (scripts/bench.py --only real): sizes, the inputs both systems read, and our
workloads on SmolLM2-135M-Instruct. The torch / TRL side is scripts/bench_real_torch.py; the driver and the
report scripts/bench_real.py. JAX is imported inside the functions (the torch worker reads this file too).

Both systems load the same weights: ours through the importer's HF directory (rlhf_jax.hf.load), torch through
`from_pretrained` of that same directory. Both fine-tune every parameter (LoRA off on our side, no peft on
TRL's): the same update, and a frozen copy of the model as the reference.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from bench_harness import ROOT, Stepper, StopBench

# The sizes issue 35 sets; bench.py's --runs, --dtype, --gen-batches and --workloads choose how much of it runs.
REAL = dict(
    grpo=dict(prompts=8, group=4, new_tokens=32, temperature=0.7, beta=0.04, lr=2e-5),
    dpo=dict(pairs=8, beta=0.1, lr=2e-5),
    generate=dict(batches=(16, 64), prompt_len=16, new_tokens=64, temperature=0.7),
    fwdbwd=dict(batch=8, seq_len=128),
)
STEP_WARMUP = 2  # GRPO / DPO steps left out of the median: the first compiles (ours) or warms the allocator (torch)


def write_inputs(directory: str, s: dict) -> dict:
    """The files both systems read, so their prompts and pairs are the same text:
    prompts.jsonl  s["grpo"]["prompts"] built-in instructions as {"messages": [user turn]} (the 8 short kinds of
                   scripts/smollm2_rlvr.py); each GRPO iteration of either system reads all of them, so every
                   iteration has the same prompts on both sides. The task's system message goes in front
                   (`grpo_messages`): ours through config.data.chat_system, TRL's as a system turn.
    pairs.jsonl    s["dpo"]["pairs"] built-in comparisons in the pairwise format: {"prompt": [user turn],
                   "chosen", "rejected"} (the best and the worst of a ranked built-in example)."""
    sys.path.insert(0, ROOT)
    from rlhf_jax.data import builtin_preferences
    from rlhf_jax.tasks import builtin

    os.makedirs(directory, exist_ok=True)
    kinds = ("copy", "reverse", "sort", "add", "subtract", "count", "first", "last")
    prompts = builtin.write_prompts(os.path.join(directory, "prompts.jsonl"), s["grpo"]["prompts"], 0, kinds=kinds)
    pairs = os.path.join(directory, "pairs.jsonl")
    with open(pairs, "w") as f:
        for e in builtin_preferences.examples(s["dpo"]["pairs"], seed=0):
            best, worst = e["ranking"][0], e["ranking"][-1]
            prompt = [{"role": "user", "content": e["prompt"]}]
            f.write(json.dumps({"prompt": prompt, "chosen": e["responses"][best], "rejected": e["responses"][worst]}))
            f.write("\n")
    return {"prompts": prompts, "pairs": pairs}


def system_message() -> str:
    sys.path.insert(0, ROOT)
    from rlhf_jax.tasks.instructions import SYSTEM_PROMPT

    return SYSTEM_PROMPT


def grpo_messages(prompts_path: str) -> list[list[dict]]:
    """The GRPO prompts as the chat both systems render: the task's system turn, then the record's turns."""
    with open(prompts_path) as f:
        records = [json.loads(line)["messages"] for line in f if line.strip()]
    return [[{"role": "system", "content": system_message()}, *m] for m in records]


def read_pairs(pairs_path: str) -> list[dict]:
    with open(pairs_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def generate_prompt(s: dict, batch: int, vocab: int):
    """The same int32 prompt ids in both systems, [batch, prompt_len] (ids 4.. avoid the special tokens)."""
    import numpy as np

    return np.random.default_rng(0).integers(4, vocab, (batch, s["prompt_len"])).astype(np.int32)


# ----------------------------------------------------------------------------- ours


def _mesh():
    import jax

    from rlhf_jax import parallel

    return parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]), parallel.DEFAULT_RULES


def _stage_config(preset: str, spec: dict):
    sys.path.insert(0, ROOT)
    from configs import smollm2

    c = smollm2.get_config(preset)
    c.init_from = spec["model_dir"]
    c.model.lora.rank = 0  # full fine-tuning, as TRL without peft: the same update and a reference copy
    c.model.dtype = spec["dtype"]
    c.model.remat = spec.get("remat", "none")
    c.progress = False
    c.checkpoint.every, c.sample_every, c.log_every = 10**6, 0, 1
    c.num_steps = STEP_WARMUP + spec["runs"] + 1  # one more than the driver asks for: it never ends on its own
    return c


def _stepped(train, c):
    """Runs a stage (`train(c, workdir)`) pausing at each step's metrics record (LoopTail.write) for the driver;
    the pause replies with the step's time/* split and shapes. The driver's "quit" ends it."""
    from rlhf_jax.loop import LoopTail

    stepper, write, last = Stepper(), LoopTail.write, {"step": None}
    keys = (
        "time/generate_s",
        "time/score_s",
        "time/update_s",
        "perf/compilations",
        "perf/prompt_width",
        "perf/response_width",
        "objective/response_length",
    )

    def pausing_write(self, step, metrics):
        record = write(self, step, metrics)
        if step != last["step"]:  # one pause per step, whatever else a step writes
            last["step"] = step
            stepper.pause({k: float(metrics[k]) for k in keys if k in metrics})
        return record

    LoopTail.write = pausing_write
    stepper.start()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            train(c, workdir)
        except StopBench:
            pass
    sys.stdout.flush()
    os._exit(0)  # skip the stage's checkpoint threads: the driver has what it asked for


def grpo_config(spec: dict):
    """configs/smollm2.py:rlvr (GRPO, the gold judge) as it runs by default — data.max_prompt_len and the
    length buckets untouched — resized to the benchmark's prompts, G, response length and β."""
    s, c = spec["shape"], _stage_config("rlvr", spec)
    c.data.prompts_path, c.data.chat_system = spec["inputs"]["prompts"], system_message()
    c.rollout.update(max_new_tokens=s["new_tokens"], samples_per_prompt=s["group"], temperature=s["temperature"])
    c.kl.init_coef, c.optim.lr = s["beta"], s["lr"]
    c.batch_size = s["prompts"] * s["group"]
    return c


def jax_grpo(spec: dict):
    from rlhf_jax.stages import pg

    _stepped(pg.train_and_evaluate, grpo_config(spec))


def jax_dpo(spec: dict):
    """configs/smollm2.py:dpo (its seq_len and prompt length) on the benchmark's pairs: one step = one batch of
    every pair, the reference's log-probs computed in the step (never precomputed)."""
    from rlhf_jax.stages import dpo

    s, c = spec["shape"], _stage_config("dpo", spec)
    c.data.update(train_path=spec["inputs"]["pairs"], format="pairwise")
    c.dpo.beta, c.optim.lr = s["beta"], s["lr"]
    c.batch_size, c.eval_every, c.eval_batches = s["pairs"], 10**6, 0
    _stepped(dpo.train_and_evaluate, c)


def jax_generate(spec: dict):
    """rlhf_jax.sampling.sample with the KV cache, every sample exactly new_tokens long (EOS = an id the model
    cannot draw), on the imported model in spec["dtype"]."""
    import jax

    from rlhf_jax import perf
    from rlhf_jax.hf import load
    from rlhf_jax.sampling import SamplingSettings, inference_params, sample

    s, B = spec["shape"], spec["batch"]
    mesh, rules = _mesh()
    perf.compilations()  # what `python -m rlhf_jax.sample` does: the heap each compile frees goes back to the OS
    model, params = load.load_model(spec["model_dir"], mesh, rules, dtype=spec["dtype"])
    params = inference_params(params, model.cfg)  # as the sampler holds them: bf16 weights in the bf16 policy
    V = model.cfg.vocab_size
    settings = SamplingSettings(
        max_new_tokens=s["new_tokens"], temperature=s["temperature"], top_k=0, top_p=1.0, eos_id=V, pad_id=0
    )
    fn = jax.jit(lambda p, t, m, k: sample(p, t, m, k, model=model, settings=settings))
    prompt = jax.numpy.asarray(generate_prompt(s, B, V))
    mask = jax.numpy.ones_like(prompt)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(0), B))

    def run():
        out = jax.device_get(fn(params, prompt, mask, keys)["tokens"])
        assert out.shape == (B, s["new_tokens"]), out.shape

    return run


def jax_fwdbwd(spec: dict):
    """Gradient of the mean token NLL (rlhf_jax.forward.token_nll) over [batch, seq_len] tokens: forward and
    backward, no optimizer."""
    import jax
    import numpy as np

    from rlhf_jax import perf
    from rlhf_jax.forward import token_nll
    from rlhf_jax.hf import load

    s = spec["shape"]
    mesh, rules = _mesh()
    perf.compilations()  # as every stage's Run does: the heap each compile frees goes back to the OS
    model, params = load.load_model(spec["model_dir"], mesh, rules, dtype=spec["dtype"])
    tokens = np.random.default_rng(0).integers(4, model.cfg.vocab_size, (s["batch"], s["seq_len"] + 1))
    tokens = jax.numpy.asarray(tokens, jax.numpy.int32)
    batch = {"tokens": tokens, "input_mask": jax.numpy.ones_like(tokens), "loss_mask": jax.numpy.ones_like(tokens)}

    def loss(p):
        nll, mask = token_nll(p, model, batch)
        return jax.numpy.sum(nll * mask) / jax.numpy.sum(mask)

    grad = jax.jit(jax.grad(loss))

    def run():
        jax.block_until_ready(grad(params))

    return run
