"""SIGKILL soak: kill a training run at random moments, rerun the same command, compare with an uninterrupted run.

    python scripts/kill_soak.py --trials 10 [--steps 60] [--seed 0] [--workdir /tmp/kill_soak]

Each trial starts (or resumes) the tiny pretraining stage with frequent asynchronous
checkpoints, waits until it trains, sleeps a random time, then SIGKILLs it — no
handler runs, so a checkpoint being written at that moment is cut off. The next
launch must resume from the newest *complete* checkpoint (orbax renames a step's
directory into place only when it is whole). After the last trial the run is
finished and its per-step losses and final params must equal, bit for bit, those
of a run that was never interrupted. Prints one row per trial and exits non-zero
on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

from rlhf_jax.xla_flags import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = "compiled and ran the first step"


def command(workdir: str, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlhf_jax.main",
        "--config=configs/pretrain.py:tiny",
        f"--workdir={workdir}",
        f"--config.num_steps={steps}",
        "--config.checkpoint.every=3",
        "--config.checkpoint.keep=2",
        "--config.checkpoint.use_async=True",
        "--config.log_every=1",
        "--config.eval_every=1000000",
        "--config.optim.warmup_steps=5",
        "--config.progress=False",
    ]


def environment(cache_dir: str) -> dict[str, str]:
    # Two fake devices keep the data-parallel path (any other XLA flag set here is kept); the compilation
    # cache makes each relaunch cheap.
    return dict(
        os.environ,
        XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 2),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )


def complete_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def partial_saves(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return [x for x in os.listdir(d) if not x.isdigit()] if os.path.isdir(d) else []


def launch(workdir: str, steps: int, env: dict, log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(command(workdir, steps), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_line(proc: subprocess.Popen, log_path: str, text: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path) as f:
            if text in f.read():
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError(f"no {text!r} in {log_path} after {timeout:.0f}s")


def resumed_step(log_path: str) -> int | None:
    with open(log_path) as f:
        m = re.search(r"resumed from \S+/checkpoints/(\d+)", f.read())
    return int(m.group(1)) if m else None


def run_to_end(workdir: str, steps: int, env: dict, log_path: str) -> float:
    t0 = time.time()
    proc = launch(workdir, steps, env, log_path)
    if proc.wait(timeout=900):
        raise RuntimeError(f"{' '.join(command(workdir, steps))} failed; see {log_path}")
    return time.time() - t0


def losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def params_digest(workdir: str) -> str:
    """SHA-256 over the names and bytes of the final checkpoint's params, restored onto one device."""
    import absl.logging
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax warns that params/ has no step metadata file
    root = os.path.join(workdir, "checkpoints", str(complete_steps(workdir)[-1]), "params")
    ckptr = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
        ckptr.metadata(root).item_metadata,
        is_leaf=lambda x: hasattr(x, "shape"),
    )
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(ckptr.restore(root, target))[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def soak(trials: int, steps: int, seed: int, workdir: str, print_fn=print) -> dict:
    """Runs the soak; returns {"trials": [...], "match": bool, ...}. Raises AssertionError on a bad resume."""
    rnd = random.Random(seed)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    env = environment(os.path.join(workdir, "xla_cache"))
    ref, killed = os.path.join(workdir, "reference"), os.path.join(workdir, "killed")

    # The uninterrupted run; also times the training part, which sets the window the kills fall in.
    proc = launch(ref, steps, env, os.path.join(workdir, "reference.log"))
    wait_for_line(proc, os.path.join(workdir, "reference.log"), FIRST_STEP, 600)
    t_train = time.time()
    if proc.wait(timeout=900):
        raise RuntimeError(f"the reference run failed; see {workdir}/reference.log")
    window = time.time() - t_train
    print_fn(f"reference run: {steps} steps, {window:.1f}s after the first step; killing at U(0, {window:.1f}s)")
    print_fn(f"{'trial':>5} {'kill at':>8} {'complete ckpts':>16} {'partial save':>12} {'resumed from':>12}")

    rows, attempts, pending = [], 0, None  # pending: the last kill's row, until a launch shows its resume
    while len(rows) < trials:
        attempts += 1
        if attempts > 4 * trials:
            raise RuntimeError("too many launches finished before their kill time; use more --steps")
        before = complete_steps(killed)
        log = os.path.join(workdir, f"launch{attempts}.log")
        proc = launch(killed, steps, env, log)
        resumed_expect = before[-1] if before else None
        if not wait_for_line(proc, log, FIRST_STEP, 600):  # it finished or failed before training
            raise RuntimeError(f"launch {attempts} exited early; see {log}")
        got = resumed_step(log)
        assert got == resumed_expect, (
            f"launch {attempts} resumed from {got}, expected the last complete {resumed_expect}"
        )
        if pending is not None:
            pending["resumed_from"], pending = got, None
        delay = rnd.uniform(0.0, window)
        time.sleep(delay)
        if proc.poll() is not None:  # finished before the kill: start over from scratch for this trial
            shutil.rmtree(killed)
            continue
        partial = partial_saves(killed)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = partial or partial_saves(killed)
        if complete_steps(killed)[-1:] == [steps]:  # killed after its last save: nothing left to resume
            shutil.rmtree(killed)
            continue
        pending = {
            "trial": len(rows) + 1,
            "kill_at_s": round(delay, 2),
            "complete": complete_steps(killed),
            "partial_save": bool(partial),
            "resumed_from": None,
        }
        rows.append(pending)

    final_log = os.path.join(workdir, "final.log")
    run_to_end(killed, steps, env, final_log)
    pending["resumed_from"] = resumed_step(final_log)
    for r in rows:
        assert r["resumed_from"] == (r["complete"][-1] if r["complete"] else None), r
        print_fn(
            f"{r['trial']:>5} {r['kill_at_s']:>7.2f}s {str(r['complete']):>16} {str(r['partial_save']):>12} "
            f"{str(r['resumed_from']):>12}"
        )

    ref_losses, got_losses = losses(ref), losses(killed)
    same_losses = ref_losses == got_losses
    same_params = params_digest(ref) == params_digest(killed)
    print_fn(
        f"losses at all {len(ref_losses)} steps equal to the uninterrupted run: {same_losses}; "
        f"final params equal: {same_params}; kills during a checkpoint write: "
        f"{sum(r['partial_save'] for r in rows)}/{trials}"
    )
    return {
        "trials": rows,
        "same_losses": same_losses,
        "same_params": same_params,
        "ref_losses": ref_losses,
        "losses": got_losses,
        "window_s": window,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/rlhf_jax_kill_soak")
    a = p.parse_args()
    t0 = time.time()
    out = soak(a.trials, a.steps, a.seed, a.workdir)
    print(f"{a.trials} trials in {time.time() - t0:.0f}s")
    sys.exit(0 if out["same_losses"] and out["same_params"] else 1)


if __name__ == "__main__":
    main()
