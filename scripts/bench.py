"""rlhf_jax side by side with PyTorch + Hugging Face transformers, on this machine.

    python scripts/bench.py [--quick] [--out bench.json] [--runs 5] [--only all|lm|grpo]

Measures, for the same model shape, batch, sequence length and dtype policy:
  train_step  one LM step (forward + backward + AdamW with clipping): tokens/s and
              MFU, in float32 and in the bf16-compute / f32-accumulate policy
              (torch: `torch.autocast("cpu", dtype=torch.bfloat16)`);
  generate    sampling with a KV cache, every sample exactly `new_tokens` long: tokens/s;
  ppo         iterations of PPO on the pg stage itself (its `time/*` metrics): episodes/s and
              the share of the iteration spent generating (no PyTorch counterpart);
  grpo        one GRPO iteration of the policy-gradient stage (configs/grpo.py) against TRL's
              GRPOTrainer (scripts/bench_trl.py) on the same model shape, G, prompts, prompt and
              response lengths, reward function and tokenizer, one update per batch, β = 0.04
              with a reference model: episodes/s, TRL in float32 and with bf16 autocast;
  peak        the best FLOP/s of one large square matmul, per dtype, in both systems.

Each system runs in its own worker process (so peak RSS, `ru_maxrss`, is its own)
that builds and warms up once (compile / warm-up time reported apart), then the
two are asked for one timed run each, alternating which goes first, and the
median of the runs is reported (the best run too, as a check on interference).
A full run takes about 5 minutes on an idle 2-core machine; other work on the
machine slows PyTorch's OpenMP threads far more than JAX, so only numbers from
an idle machine compare the two (the load average is printed and saved).
--quick is a smoke test (seconds): its numbers mean nothing.
Needs `pip install -r requirements-parity.txt`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Callable

from rlhf_jax.xla_flags import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# GPT-2-like shape: d_model >= 512 so the MFU figure is about matmuls, not overheads.
FULL = dict(
    train=dict(vocab=8192, d_model=512, n_layers=8, n_heads=8, seq_len=256, batch=8),
    generate=dict(vocab=8192, d_model=512, n_layers=8, n_heads=8, batch=64, prompt_len=16, new_tokens=64,
                  temperature=0.7),
    ppo=dict(d_model=128, n_layers=4, n_heads=4, batch=64, new_tokens=32, iterations=7),
    grpo=dict(d_model=128, n_layers=4, n_heads=4, max_len=128, vocab=2048, batch=64, group=8, max_prompt_len=32,
              new_tokens=32, temperature=0.7, beta=0.04, lr=1e-5, iterations=8),
)
# One layer: XLA's compile time grows with depth, and --quick only checks that everything runs.
QUICK = dict(
    train=dict(vocab=256, d_model=64, n_layers=1, n_heads=2, seq_len=32, batch=4),
    generate=dict(vocab=256, d_model=64, n_layers=1, n_heads=2, batch=8, prompt_len=8, new_tokens=8,
                  temperature=0.7),
    ppo=dict(d_model=32, n_layers=1, n_heads=2, batch=8, new_tokens=8, iterations=3),
    grpo=dict(d_model=32, n_layers=1, n_heads=2, max_len=64, vocab=384, batch=8, group=4, max_prompt_len=24,
              new_tokens=8, temperature=0.7, beta=0.04, lr=1e-5, iterations=3),
)
GRPO_WARMUP = 2  # iterations left out of the median: the first compiles (ours) or warms the allocator (torch)
OPTIM = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
DTYPES = ("bfloat16", "float32")


# ----------------------------------------------------------------------------- worker side

def serve(workloads: dict[str, Callable[[dict], Callable[[], None]]], peak: Callable[[], dict],
          warmup: int = 2) -> None:
    """Worker loop: one JSON command per stdin line, one JSON reply per line on the real stdout.

    {"cmd": "setup", "task", "spec"}: `workloads[task](spec)` builds a workload and returns `run()`,
        which does one unit of work and returns when it has finished; it is run `warmup` times
        (the first compiles, or warms torch's allocator) → {"setup_s", "warmup_s": [...]}.
    "run" → {"seconds", "cpu_s"};  "peak" → `peak()`;  "rss" → {"rss_mib"};  "quit" ends the worker.
    """
    proto = protocol_stream()
    proto.write(json.dumps({"hello": True}) + "\n")  # imports done: nothing after this overlaps a timing
    run = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            run = None  # free the previous workload first
            gc.collect()
            t0 = time.perf_counter()
            run = workloads[msg["task"]](msg["spec"])
            reply = {"setup_s": time.perf_counter() - t0, "warmup_s": []}
            for _ in range(warmup):
                t = time.perf_counter()
                run()
                reply["warmup_s"].append(time.perf_counter() - t)
        elif msg["cmd"] == "run":
            t, cpu = time.perf_counter(), time.process_time()
            run()
            # CPU seconds over all threads: well below cores × seconds means other work had the cores.
            reply = {"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - cpu}
        elif msg["cmd"] == "peak":
            reply = peak()
        elif msg["cmd"] == "rss":
            reply = {"rss_mib": peak_rss_mib()}
        else:
            return
        proto.write(json.dumps(reply) + "\n")


def protocol_stream():
    """The worker's replies go to the real stdout; anything a library prints goes to stderr instead."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return proto


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _jax_model(s: dict, dtype: str, max_len: int):
    from rlhf_jax.models.gpt import TransformerLM
    from rlhf_jax.models.layers import ModelConfig

    return TransformerLM(ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["n_layers"],
                                     n_heads=s["n_heads"], max_len=max_len, dtype=dtype))


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
    model = _jax_model(s, spec["dtype"], s["seq_len"])
    ocfg = ml_collections.ConfigDict(dict(name="adamw", schedule="constant", warmup_steps=0, total_steps=-1,
                                          final_lr_fraction=1.0, **OPTIM))
    tx, schedule = optim.make_optimizer(ocfg)
    mesh, rules = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]), parallel.DEFAULT_RULES
    state, sh = train_state.create(train_state.model_init_fn(model, s["seq_len"], 0), tx, mesh, rules, seed=0)
    tokens = tokens_for(s, (s["batch"], s["seq_len"] + 1))
    local = {"tokens": tokens, "input_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
    with parallel.activate(mesh, rules):
        step = jax.jit(make_train_step(model, tx, schedule, 1), in_shardings=(sh, parallel.batch_sharding(mesh, rules)),
                       out_shardings=(sh, parallel.replicated(mesh)), donate_argnums=(0,))
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
    import numpy as np

    from rlhf_jax import train_state
    from rlhf_jax.sampling import SamplingSettings, sample

    s = spec["shape"]
    B, P, N = s["batch"], s["prompt_len"], s["new_tokens"]
    model = _jax_model(s, spec["dtype"], P + N)
    params = nn.meta.unbox(jax.jit(train_state.model_init_fn(model, P, 0, heads=("lm",)))())
    # eos = the last id: EOS ends a sample's *mask*, never the loop, so every run decodes N steps.
    settings = SamplingSettings(max_new_tokens=N, temperature=s["temperature"], top_k=0, top_p=1.0,
                                eos_id=s["vocab"] - 1, pad_id=0)
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
    """Runs PPO (configs/ppo.py:tiny, resized, on the pg stage) and returns its per-iteration `time/*` metrics."""
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
    keys = ("time/generate_s", "time/score_s", "time/update_s", "perf/episodes_per_sec",
            "perf/rollout_tokens_per_sec", "time/generate_frac")
    return {"iterations": [{k: r[k] for k in keys} for r in rows], "config": {
        "model": c.model.to_dict(), "batch_size": c.batch_size, "max_prompt_len": c.data.max_prompt_len,
        "max_new_tokens": c.rollout.max_new_tokens, "epochs": c.pg.epochs,
        "num_minibatches": c.pg.num_minibatches, "reward": c.reward.function}}


def grpo_inputs(directory: str, s: dict) -> dict:
    """What both GRPO runs read: a byte-level BPE tokenizer.json trained on the built-in corpus (with
    <pad>, </s>, <s>), and 512 built-in instructions as {"prompt"} lines."""
    import json as _json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, ROOT)
    from rlhf_jax.data import builtin_text
    from rlhf_jax.tasks import builtin

    corpus, prompts = os.path.join(directory, "corpus.txt"), os.path.join(directory, "prompts.jsonl")
    builtin_text.write_builtin_corpus(corpus, num_chars=200_000, seed=0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train([corpus], trainers.BpeTrainer(vocab_size=s["vocab"], special_tokens=["<pad>", "</s>", "<s>"],
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
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
    from rlhf_jax.metrics import read_metrics
    from rlhf_jax.pipeline import stage_config
    from rlhf_jax.stages import pg

    s, inputs = spec["shape"], spec["inputs"]
    c = stage_config("grpo", "tiny", {})
    c.progress = False
    c.model.update(d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_len=s["max_len"],
                   vocab_size=-1)
    c.data.update(tokenizer_path=inputs["tokenizer"], prompts_path=inputs["prompts"], chat_template="plain",
                  max_prompt_len=s["max_prompt_len"])
    c.rollout.update(max_new_tokens=s["new_tokens"], samples_per_prompt=s["group"], temperature=s["temperature"],
                     stop_token="eos")
    c.kl.init_coef, c.optim.lr, c.optim.schedule = s["beta"], s["lr"], "constant"
    c.batch_size, c.num_steps = s["batch"], s["iterations"]
    c.checkpoint.every, c.sample_every, c.log_every = 10**6, 0, 1  # checkpoint once, at the end
    with tempfile.TemporaryDirectory() as workdir:
        pg.train_and_evaluate(c, workdir)
        rows = read_metrics(workdir)
    keys = ("time/generate_s", "time/score_s", "time/update_s", "perf/episodes_per_sec")
    return {"iterations": [{k: r[k] for k in keys} for r in rows]}


def measure_grpo(shape: dict, logdir: str) -> dict:
    """Ours, then TRL in float32, then TRL with bf16 autocast: each alone, in its own process."""
    inputs = grpo_inputs(logdir, shape)
    out = {"rlhf_jax": Worker("bench.py", "grpo", logdir, {"shape": shape, "inputs": inputs}).reply()}
    for dt in DTYPES:
        out[f"trl_{dt}"] = Worker("bench_trl.py", "grpo", logdir, {"shape": shape, "inputs": inputs,
                                                                   "dtype": dt}).reply()
    return out


def summarize_grpo(r: dict, s: dict) -> dict:
    """Episodes/s from the median iteration after GRPO_WARMUP, for each system, and our ratio to TRL's best."""
    ours = [i["time/generate_s"] + i["time/score_s"] + i["time/update_s"] for i in r["rlhf_jax"]["iterations"]]
    out = {"shape": s, "rlhf_jax": {"episodes_per_s": s["batch"] / statistics.median(ours[GRPO_WARMUP:]),
                                    "iteration_s": ours, "peak_rss_mib": r["rlhf_jax"]["peak_rss_mib"]}}
    for dt in DTYPES:
        steps = r[f"trl_{dt}"]["step_s"]
        out[f"trl_{dt}"] = {"episodes_per_s": s["batch"] / statistics.median(steps[GRPO_WARMUP:]), "iteration_s": steps,
                            "peak_rss_mib": r[f"trl_{dt}"]["peak_rss_mib"], "trl": r[f"trl_{dt}"]["trl"]}
    best = max(out[f"trl_{dt}"]["episodes_per_s"] for dt in DTYPES)
    out["ratio_vs_trl"] = out["rlhf_jax"]["episodes_per_s"] / best
    return out


# ----------------------------------------------------------------------------- driver side

class Worker:
    """One benchmark process (`script --worker ROLE`); its stderr goes to a log file, shown if it fails."""

    def __init__(self, script: str, role: str, logdir: str, spec: dict | None = None, extra_xla_flags: str = ""):
        self.name = f"{script} --worker {role}"
        fd, self.log = tempfile.mkstemp(prefix=f"{script}.{role}.", suffix=".log", dir=logdir)
        env = dict(os.environ)
        # One real CPU device: a fake device count (the test suite's) would shard the step.
        env["XLA_FLAGS"] = f'{with_device_count(env.get("XLA_FLAGS", ""), None)} {extra_xla_flags}'.strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, os.path.join(ROOT, "scripts", script), "--worker", role, "--spec", json.dumps(spec or {})]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fd, text=True,
                                     cwd=ROOT, env=env)
        os.close(fd)

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            with open(self.log) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"benchmark worker `{self.name}` exited with code {self.proc.returncode}; "
                               f"its log ends with:\n{tail}")
        return json.loads(line)

    def ask(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:  # it has already exited
            pass
        self.proc.wait(timeout=60)


def start_pair(logdir: str, extra_xla_flags: str = "") -> dict[str, Worker]:
    workers = {"rlhf_jax": Worker("bench.py", "serve", logdir, extra_xla_flags=extra_xla_flags),
               "torch": Worker("bench_torch.py", "serve", logdir)}
    for w in workers.values():
        w.reply()  # "hello": both have imported their libraries
    return workers


def side_by_side(workers: dict[str, Worker], task: str, spec: dict, runs: int, pause_s: float = 0.3) -> dict:
    """One workload on both systems: each builds and warms up alone, then timed runs alternate (who goes first flips)."""
    load = [os.getloadavg()[0]]
    ready = {k: w.ask("setup", task=task, spec=spec) for k, w in workers.items()}
    runs_of = {k: [] for k in workers}
    for i in range(runs):
        for name in (("rlhf_jax", "torch") if i % 2 == 0 else ("torch", "rlhf_jax")):
            time.sleep(pause_s)  # let the other system's idle threads stop spinning
            runs_of[name].append(workers[name].ask("run"))
    load.append(os.getloadavg()[0])
    out = {}
    for k, w in workers.items():
        seconds = [r["seconds"] for r in runs_of[k]]
        out[k] = {"seconds": seconds, "cpu_s": [r["cpu_s"] for r in runs_of[k]], "median_s": statistics.median(seconds),
                  "min_s": min(seconds), "setup_s": ready[k]["setup_s"], "warmup_s": ready[k]["warmup_s"],
                  "peak_rss_mib": w.ask("rss")["rss_mib"]}
    out["loadavg_1m"] = load  # before and after: the machine's other work during this workload
    return out


def _progress(msg: str, t0: float):
    print(f"[bench {time.perf_counter() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)


def measure_all(shapes: dict, runs: int, quick: bool, logdir: str) -> dict:
    """Peak FLOP/s, then train and generate in both dtypes, then the PPO stage.

    A full run gives every workload its own pair of workers (so each peak RSS belongs to one
    workload) and runs the PPO stage alone. --quick only checks that everything runs: one pair
    serves all workloads, the PPO stage runs beside them (its compiles use the other core), and
    XLA compiles without LLVM optimisation (half the compile time of these tiny, fast programs).
    """
    results, t0 = {}, time.perf_counter()
    _progress("starting workers, measuring peak FLOP/s", t0)
    flags = "--xla_backend_optimization_level=0" if quick else ""
    ppo = Worker("bench.py", "ppo", logdir, {"shape": shapes["ppo"]}, flags) if quick else None
    workers = start_pair(logdir, flags)
    try:
        results["peak"] = {k: w.ask("peak") for k, w in workers.items()}
        for task in ("train", "generate"):
            for dt in DTYPES:
                _progress(f"{task} {dt}", t0)
                if not quick and results.keys() != {"peak"}:
                    for w in workers.values():
                        w.close()
                    workers = start_pair(logdir)
                spec = {"shape": shapes[task], "dtype": dt}
                results[f"{task}_{dt}"] = side_by_side(workers, task, spec, runs, pause_s=0.0 if quick else 0.2)
        _progress("ppo stage", t0)
        ppo = ppo or Worker("bench.py", "ppo", logdir, {"shape": shapes["ppo"]})
        results["ppo"] = ppo.reply()
    finally:
        for w in [*workers.values(), *([ppo] if ppo else [])]:
            w.close()
    _progress("done", t0)
    return results


def machine_info() -> dict:
    cpu = platform.processor()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}), "versions": versions,
            "loadavg_1m_at_start": os.getloadavg()[0]}


SYSTEMS = ("rlhf_jax", "torch")


def _rates(r: dict, units_per_run: int, flops_per_unit: float = 0.0, peak: float = 0.0, own_peak: float = 0.0):
    """Adds units/s (from the median run and from the best run), ratios and, given FLOPs, MFU."""
    for name in SYSTEMS:
        x = r[name]
        x["tokens_per_s"], x["best_tokens_per_s"] = units_per_run / x["median_s"], units_per_run / x["min_s"]
        if flops_per_unit:
            x["mfu"] = x["tokens_per_s"] * flops_per_unit / peak
            x["mfu_vs_own_dtype_peak"] = x["tokens_per_s"] * flops_per_unit / own_peak
    r["ratio_vs_torch"] = r["rlhf_jax"]["tokens_per_s"] / r["torch"]["tokens_per_s"]
    # The fastest run of each is the least disturbed by other work on the machine: a cross-check.
    r["best_run_ratio_vs_torch"] = r["rlhf_jax"]["best_tokens_per_s"] / r["torch"]["best_tokens_per_s"]
    return r


def summarize(results: dict, shapes: dict) -> dict:
    """Adds tokens/s, ratios (ours / theirs) and MFU to the raw timings."""
    from rlhf_jax import perf

    peak = results["peak"]
    bf16_peak = max(peak["rlhf_jax"]["bfloat16"], peak["torch"]["bfloat16"])  # the higher: the harder MFU
    f32_peak = max(peak["rlhf_jax"]["float32"], peak["torch"]["float32"])
    s, g = shapes["train"], shapes["generate"]
    flops_per_token = perf.train_flops_per_token(_jax_model(s, "float32", s["seq_len"]).cfg, s["seq_len"])
    train = {"flops_per_token": flops_per_token, "shape": s}
    gen = {"shape": g}
    for dt in DTYPES:
        train[dt] = _rates(results[f"train_{dt}"], s["batch"] * s["seq_len"], flops_per_token, bf16_peak,
                           bf16_peak if dt == "bfloat16" else f32_peak)
        gen[dt] = _rates(results[f"generate_{dt}"], g["batch"] * g["new_tokens"])
    # Headline: the project's own policy (bf16 compute, f32 params and accumulation).
    train["ratio_vs_torch"] = train["bfloat16"]["ratio_vs_torch"]
    train["mfu"] = train["bfloat16"]["rlhf_jax"]["mfu"]
    gen["ratio_vs_torch"] = gen["bfloat16"]["ratio_vs_torch"]
    its = results["ppo"]["iterations"][1:]  # the first iteration compiles
    med = lambda k: statistics.median(i[k] for i in its)
    ppo = {"episodes_per_s": med("perf/episodes_per_sec"), "generate_frac": med("time/generate_frac"),
           "generate_s": med("time/generate_s"), "score_s": med("time/score_s"), "update_s": med("time/update_s"),
           "rollout_tokens_per_s": med("perf/rollout_tokens_per_sec"), "timed_iterations": len(its),
           "first_iteration_s": sum(results["ppo"]["iterations"][0][k] for k in
                                    ("time/generate_s", "time/score_s", "time/update_s")),
           "peak_rss_mib": results["ppo"]["peak_rss_mib"], "config": results["ppo"]["config"]}
    return {"train_step": train, "generate": gen, "ppo": ppo,
            "peak_flops": {"bfloat16": bf16_peak, "float32": f32_peak, "by_system": peak,
                           "method": "best of 5 timed runs of one 2048x2048 @ 2048x2048 matmul in that dtype with "
                                     "f32 accumulation (jax: jnp.dot(preferred_element_type=f32), jitted; torch: "
                                     "a @ b, 2 threads); MFU divides by the higher of the two systems' bf16 peak"}}


def goals(out: dict) -> dict:
    found = {}
    if "train_step" in out:
        t, g = out["train_step"], out["generate"]
        found = {"train_step >= 2x torch tokens/s (bf16 policy)": t["bfloat16"]["ratio_vs_torch"] >= 2.0,
                 "train_step >= 2x torch tokens/s (float32)": t["float32"]["ratio_vs_torch"] >= 2.0,
                 "generate >= 3x torch tokens/s (bf16 policy)": g["bfloat16"]["ratio_vs_torch"] >= 3.0,
                 "generate >= 3x torch tokens/s (float32)": g["float32"]["ratio_vs_torch"] >= 3.0,
                 "train_step MFU >= 40% of measured bf16 peak": t["mfu"] >= 0.40}
    if "grpo" in out:
        found["grpo iteration >= 3x TRL GRPOTrainer episodes/s (its faster dtype)"] = out["grpo"]["ratio_vs_trl"] >= 3.0
    return found


def table(out: dict) -> str:
    m = out["machine"]
    v = m["versions"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, bf16 instructions {m['bf16_instructions'] or 'none'}; "
             f"jax {v['jax']}, flax {v['flax']}, torch {v['torch']}"
             + (f" ({m['torch_threads']} threads)" if "torch_threads" in m else "")
             + f", transformers {v['transformers']}, trl {v.get('trl')}",
             f"load average (1 min) before the benchmark {m['loadavg_1m_at_start']:.2f}, after it "
             f"{m['loadavg_1m_at_end']:.2f} (which counts the benchmark's own threads)"
             + ("  <- other work was running: treat the numbers as provisional"
                if m['loadavg_1m_at_start'] > 0.5 else "")]
    if "train_step" in out:
        lines += _lm_table(out)
    if "grpo" in out:
        q, s = out["grpo"], out["grpo"]["shape"]
        lines += ["", f"grpo iteration ({s['batch']} episodes = {s['batch'] // s['group']} prompts x G={s['group']}, "
                      f"d_model {s['d_model']} x {s['n_layers']} layers, {s['new_tokens']} new tokens, one update, "
                      f"β {s['beta']}; median of {len(q['rlhf_jax']['iteration_s']) - GRPO_WARMUP} iterations):"]
        lines += [f"  {name:<22}{q[k]['episodes_per_s']:>8.1f} episodes/s   RSS {q[k]['peak_rss_mib']:.0f} MiB"
                  for name, k in (("rlhf_jax (bf16)", "rlhf_jax"), ("TRL GRPOTrainer f32", "trl_float32"),
                                  ("TRL GRPOTrainer bf16", "trl_bfloat16"))]
        lines.append(f"  ratio vs TRL's faster: {q['ratio_vs_trl']:.2f}x")
    lines += ["", "goals:"]
    if out["quick"]:
        lines[-1] = "goals (NOT meaningful with --quick: tiny shapes, unoptimised XLA, PPO running alongside):"
    lines += [f"  [{'met' if ok else 'MISSED'}] {k}" for k, ok in out["goals"].items()]
    return "\n".join(lines)


def _lm_table(out: dict) -> list[str]:
    p = out["peak_flops"]
    lines = [f"peak matmul FLOP/s: bf16 {p['bfloat16'] / 1e9:.0f} G, f32 {p['float32'] / 1e9:.0f} G  "
             f"(jax bf16 {p['by_system']['rlhf_jax']['bfloat16'] / 1e9:.0f} / f32 "
             f"{p['by_system']['rlhf_jax']['float32'] / 1e9:.0f}, torch bf16 "
             f"{p['by_system']['torch']['bfloat16'] / 1e9:.0f} / f32 {p['by_system']['torch']['float32'] / 1e9:.0f})",
             "", f"{'benchmark (median)':<28}{'rlhf_jax':>12}{'torch':>12}{'ours/theirs':>13}{'best runs':>11}"
                 f"{'warmup ours/theirs (s)':>25}{'RSS MiB ours/theirs':>22}"]
    t, g = out["train_step"], out["generate"]
    rows = [(f"train tok/s {dt}", t[dt]) for dt in DTYPES] + [(f"generate tok/s {dt}", g[dt]) for dt in DTYPES]
    for label, r in rows:
        a, b = r["rlhf_jax"], r["torch"]
        lines.append(f"{label:<28}{a['tokens_per_s']:>12.0f}{b['tokens_per_s']:>12.0f}{r['ratio_vs_torch']:>12.2f}x"
                     f"{r['best_run_ratio_vs_torch']:>10.2f}x{a['warmup_s'][0]:>14.1f} / {b['warmup_s'][0]:<8.1f}"
                     f"{a['peak_rss_mib']:>12.0f} / {b['peak_rss_mib']:<8.0f}")
    for dt in DTYPES:
        a, b = t[dt]["rlhf_jax"], t[dt]["torch"]
        lines.append(f"{'train MFU ' + dt:<28}{a['mfu']:>11.1%} {b['mfu']:>11.1%}   (of the bf16 peak; "
                     f"of the {dt} peak: {a['mfu_vs_own_dtype_peak']:.1%} / {b['mfu_vs_own_dtype_peak']:.1%})")
    q = out["ppo"]
    lines += ["", f"ppo iteration ({q['config']['batch_size']} episodes, d_model {q['config']['model']['d_model']}, "
                  f"{q['config']['max_new_tokens']} new tokens, {q['config']['epochs']}x"
                  f"{q['config']['num_minibatches']} minibatches): {q['episodes_per_s']:.1f} episodes/s, "
                  f"generate {q['generate_frac']:.0%} of the iteration (generate {q['generate_s']:.3f}s, score "
                  f"{q['score_s']:.3f}s, update {q['update_s']:.3f}s; median of {q['timed_iterations']}), "
                  f"RSS {q['peak_rss_mib']:.0f} MiB"]
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the whole benchmark")
    ap.add_argument("--out", default="bench.json", help="where to write the JSON results")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per system and workload (median reported)")
    ap.add_argument("--only", choices=("all", "lm", "grpo"), default="all",
                    help="lm: train, generate, PPO and the peak (vs PyTorch); grpo: GRPO vs TRL; all: both")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, json.loads(args.spec))
    for pkg in ("torch", "transformers") + (("trl",) if args.only != "lm" else ()):
        try:
            metadata.version(pkg)
        except metadata.PackageNotFoundError:
            sys.exit(f"scripts/bench.py compares with PyTorch and TRL: {pkg} is not installed. "
                     f"Run `pip install -r requirements-parity.txt` (a CPU build of torch first).")
    if args.runs < 1:
        sys.exit(f"--runs={args.runs}: need at least 1 timed run (5 or more for a median worth reporting).")
    shapes = QUICK if args.quick else FULL
    out = {"quick": args.quick, "runs": args.runs, "machine": machine_info()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_logs_") as logdir:
        if args.only != "grpo":
            results = measure_all(shapes, args.runs, args.quick, logdir)
            out["machine"]["torch_threads"] = results["peak"]["torch"].pop("threads")
            out.update(summarize(results, shapes))
        if args.only != "lm":
            _progress("grpo vs trl", t0)
            out["grpo"] = summarize_grpo(measure_grpo(shapes["grpo"], logdir), shapes["grpo"])
    out["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    out["goals"] = goals(out)
    out["wall_s"] = time.perf_counter() - t0
    print(table(out))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out} ({out['wall_s']:.0f}s)")
    return out


def run_worker(role: str, spec: dict):
    if role == "serve":
        import rlhf_jax.stages.lm  # noqa: F401  (import jax, flax, optax before saying hello)

        return serve({"train": jax_train, "generate": jax_generate}, jax_peak)
    proto = protocol_stream()
    result = jax_grpo(spec) if role == "grpo" else jax_ppo(spec)
    result["peak_rss_mib"] = peak_rss_mib()
    proto.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
