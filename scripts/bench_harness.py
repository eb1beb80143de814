"""The benchmark harness: worker processes and a line protocol to time workloads in them, side by side.

scripts/bench.py drives it; the workers are scripts/bench.py (rlhf_jax), scripts/bench_torch.py (PyTorch +
transformers) and scripts/bench_trl.py (TRL), each `--worker ROLE --spec JSON`, so every system has its own
process (peak RSS, `ru_maxrss`, is its own) and builds and warms up once before its timed runs. Nothing
here knows a workload: those are scripts/bench_workloads.py (ours) and the worker scripts (theirs).
"""

from __future__ import annotations

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
from collections.abc import Callable
from importlib import metadata

from rlhf_jax.xla_flags import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- worker side


def serve(
    workloads: dict[str, Callable[[dict], Callable[[], None]]], peak: Callable[[], dict], warmup: int = 2
) -> None:
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


class StopBench(Exception):
    """The driver said "quit" while a stepped worker was paused: leave its training loop."""


class Stepper:
    """The worker side of a stepped run, for a whole training loop timed one step at a time: the loop calls
    `pause(extra)` at the end of each step; it replies {"seconds": wall time since the previous pause, ...extra}
    and waits for the driver: "run" returns (the next step starts), "rss" answers and waits again, "quit" raises
    StopBench. The first "run" is read before the loop starts (`start()`), so the first step's seconds include
    building the model and compiling: a warm-up, never a timed run."""

    def __init__(self):
        self.proto = protocol_stream()
        self.proto.write(json.dumps({"hello": True}) + "\n")
        self.t = 0.0

    def start(self):
        self._wait()

    def pause(self, extra: dict | None = None):
        reply = {"seconds": time.perf_counter() - self.t, **(extra or {})}
        self.proto.write(json.dumps(reply) + "\n")
        self._wait()

    def _wait(self):
        for line in sys.stdin:
            cmd = json.loads(line)["cmd"]
            if cmd == "run":
                self.t = time.perf_counter()
                return
            if cmd == "rss":
                self.proto.write(json.dumps({"rss_mib": peak_rss_mib()}) + "\n")
            else:
                raise StopBench
        raise StopBench


def protocol_stream():
    """The worker's replies go to the real stdout; anything a library prints goes to stderr instead."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return proto


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ----------------------------------------------------------------------------- driver side


class Worker:
    """One benchmark process (`script --worker ROLE`); its stderr goes to a log file, shown if it fails."""

    def __init__(self, script: str, role: str, logdir: str, spec: dict | None = None, extra_xla_flags: str = ""):
        self.name = f"{script} --worker {role}"
        fd, self.log = tempfile.mkstemp(prefix=f"{script}.{role}.", suffix=".log", dir=logdir)
        env = dict(os.environ)
        # One real CPU device: a fake device count (the test suite's) would shard the step.
        env["XLA_FLAGS"] = f"{with_device_count(env.get('XLA_FLAGS', ''), None)} {extra_xla_flags}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
        cmd = [
            sys.executable,
            os.path.join(ROOT, "scripts", script),
            "--worker",
            role,
            "--spec",
            json.dumps(spec or {}),
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fd, text=True, cwd=ROOT, env=env
        )
        os.close(fd)

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            with open(self.log) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(
                f"benchmark worker `{self.name}` exited with code {self.proc.returncode}; its log ends with:\n{tail}"
            )
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
    workers = {
        "rlhf_jax": Worker("bench.py", "serve", logdir, extra_xla_flags=extra_xla_flags),
        "torch": Worker("bench_torch.py", "serve", logdir),
    }
    for w in workers.values():
        w.reply()  # "hello": both have imported their libraries
    return workers


def side_by_side(workers: dict[str, Worker], task: str, spec: dict, runs: int, pause_s: float = 0.3) -> dict:
    """One workload on both systems: each builds and warms up alone, then timed runs alternate (who goes first
    flips)."""
    load = [os.getloadavg()[0]]
    ready = {k: w.ask("setup", task=task, spec=spec) for k, w in workers.items()}
    runs_of = {k: [] for k in workers}
    for i in range(runs):
        for name in ("rlhf_jax", "torch") if i % 2 == 0 else ("torch", "rlhf_jax"):
            time.sleep(pause_s)  # let the other system's idle threads stop spinning
            runs_of[name].append(workers[name].ask("run"))
    load.append(os.getloadavg()[0])
    out = {}
    for k, w in workers.items():
        seconds = [r["seconds"] for r in runs_of[k]]
        out[k] = {
            "seconds": seconds,
            "cpu_s": [r["cpu_s"] for r in runs_of[k]],
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "setup_s": ready[k]["setup_s"],
            "warmup_s": ready[k]["warmup_s"],
            "peak_rss_mib": w.ask("rss")["rss_mib"],
        }
    out["loadavg_1m"] = load  # before and after: the machine's other work during this workload
    return out


def alternate_steps(workers: dict[str, Worker], runs: int, warmup: int, pause_s: float = 0.3) -> dict:
    """Stepped workers (Stepper): `warmup` steps each, then `runs` timed steps alternating who goes first.
    Each system's steps are its own training loop's, in order; every reply's extra keys are kept per step."""
    load = [os.getloadavg()[0]]
    for w in workers.values():
        w.reply()  # "hello": imports done
    warm = {k: [w.ask("run") for _ in range(warmup)] for k, w in workers.items()}  # each alone: compiles
    steps = {k: [] for k in workers}
    names = list(workers)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            time.sleep(pause_s)
            steps[name].append(workers[name].ask("run"))
    load.append(os.getloadavg()[0])
    out = {}
    for k, w in workers.items():
        seconds = [r["seconds"] for r in steps[k]]
        out[k] = {
            "seconds": seconds,
            "steps": steps[k],
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "warmup_s": [r["seconds"] for r in warm[k]],
            "peak_rss_mib": w.ask("rss")["rss_mib"],
        }
    out["loadavg_1m"] = load
    return out


def progress(msg: str, t0: float):
    print(f"[bench {time.perf_counter() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)


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
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "versions": versions,
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def full_length_sampling(attention_mask, temperature: float, n: int, pad_id: int, **extra) -> dict:
    """transformers generate()'s arguments for what our sampler does: sample the full softmax (top_k=0 /
    top_p=1 turn off generate's default filters) for exactly n tokens (min_new_tokens = max_new_tokens)."""
    return dict(
        attention_mask=attention_mask,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=n,
        min_new_tokens=n,
        use_cache=True,
        pad_token_id=pad_id,
        **extra,
    )
