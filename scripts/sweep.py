"""Runs the sweep or ablation in experiments/<name>.py, then summarises it.

    python scripts/sweep.py experiments/lr_sweep_tiny.py --root runs/sweeps/lr_sweep_tiny --workers 2
    python scripts/sweep.py experiments/kl_coef_ppo.py --root /shared/sweeps/kl --emit slurm \
        --nodes 2 --sbatch=--partition=gpu --sbatch=--gpus-per-node=8   # then: sbatch <root>/launch/sweep.sbatch
    python scripts/sweep.py experiments/kl_coef_ppo.py --root /mnt/kl --emit tpu  # then: bash <root>/launch/tpu_pod.sh
    python scripts/sweep.py experiments/kl_coef_ppo.py --emit skypilot --accelerators tpu-v5e-16 \
        --storage gs://my-bucket/sweeps/kl       # prints the `sky jobs launch` command (pip install -e .[cloud])
    python scripts/sweep.py experiments/kl_coef_ppo.py --root /shared/sweeps/kl --collect  # only the summary

Each run has its own workdir <root>/<name>, named from its overrides (e.g. `lr=0.001`), and is the
ordinary command `python -m rlhf_jax.main --config=BASE --workdir=... --config.<key>=<value> ...`
(`rlhf_jax.pipeline` for a pipeline BASE). A run is finished once its final checkpoint exists (a
stage) or its report.md does (a pipeline); DONE.json then records it and a rerun skips it, while an
interrupted run resumes from its latest checkpoint. Local runs go N at a time (--workers N); Ctrl-C or
SIGTERM sends them SIGTERM, so each checkpoints before it exits with status 143 (saved, unfinished), as
the sweep then does.
On a cluster, preemption is the launcher's: a SLURM task requeues itself before its time limit and SLURM
requeues a preempted one (emit_slurm); a SkyPilot managed job replaces a preempted cluster (emit_skypilot).

The summary: the last logged value of each column in each run's metrics.jsonl (a pipeline's
summary.json) → <root>/summary.csv, summary.md, and summary.png (each column against the swept
value, and every run's curve of the first column).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from experiments import ROOT, Experiment, Run, cli_value, load_experiment  # noqa: E402

DONE = "DONE.json"
PREEMPTED = 128 + signal.SIGTERM  # a run's exit status once it saved on SIGTERM (rlhf_jax.run.PREEMPTED_EXIT)


# --- one run -----------------------------------------------------------------------------------------


def command(exp: Experiment, run: Run, workdir: str, python: str, quiet: bool = True) -> list[str]:
    """The run as an ordinary command line (relative config path: run it from the repository root)."""
    args = [python, "-m", exp.module, f"--config={exp.base}", f"--workdir={workdir}"]
    args += [f"--config.{k}={cli_value(v)}" for k, v in run.overrides.items()]
    if quiet and exp.stage != "pipeline" and "progress" not in run.overrides:
        args.append("--config.progress=False")  # logs go to files: no progress bars
    return args


def completed(workdir: str, stage: str) -> bool:
    """A pipeline wrote its report; a stage saved its checkpoint at config.num_steps."""
    if stage == "pipeline":
        return os.path.isfile(os.path.join(workdir, "report.md"))
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            num_steps = int(json.load(f)["num_steps"])
    except (OSError, KeyError, ValueError):
        return False
    return os.path.isdir(os.path.join(workdir, "checkpoints", str(num_steps)))


def finished(workdir: str, stage: str) -> bool:
    return os.path.isfile(os.path.join(workdir, DONE)) or completed(workdir, stage)


def _check_unchanged(workdir: str, run: Run) -> None:
    """A finished run is only skipped if it ran with today's overrides (FIXED may have been edited)."""
    try:
        with open(os.path.join(workdir, DONE)) as f:
            recorded = json.load(f).get("overrides")
    except (OSError, ValueError):
        return
    if recorded is not None and recorded != json.loads(json.dumps(run.overrides, default=str)):
        raise ValueError(
            f"{workdir} finished with overrides {recorded}, but the experiment now gives "
            f"{run.overrides}. Use another --root, or delete that run to redo it."
        )


def mark_done(workdir: str, run: Run, cmd: list[str], seconds: float | None) -> None:
    record = {"run": run.name, "overrides": run.overrides, "command": shlex.join(cmd), "seconds": seconds}
    _write(os.path.join(workdir, DONE), [json.dumps(record, indent=2, default=str)], 0o644)


# --- local runs --------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_local(exp: Experiment, root: str, workers: int, python: str) -> dict[str, str]:
    """Runs every unfinished run, `workers` at a time; returns {run name: status}."""
    status, pending = {}, []
    for run in exp.runs:
        if finished(os.path.join(root, run.name), exp.stage):
            _check_unchanged(os.path.join(root, run.name), run)
            status[run.name] = "finished"
            log(f"{run.name}: finished earlier, skipped")
        else:
            pending.append(run)
    # A local worker is one process even inside a multi-task SLURM allocation.
    env = {**os.environ, "RLHF_JAX_DISTRIBUTED": os.environ.get("RLHF_JAX_DISTRIBUTED", "0")}
    active: dict[str, tuple[Run, subprocess.Popen, Any, float, list[str]]] = {}
    try:
        while pending or active:
            while pending and len(active) < workers:
                run = pending.pop(0)
                workdir = os.path.join(root, run.name)
                os.makedirs(workdir, exist_ok=True)
                cmd = command(exp, run, workdir, python)
                out = open(os.path.join(workdir, "sweep.log"), "a")
                # Own session: Ctrl-C reaches only this launcher, which then SIGTERMs the runs (they checkpoint).
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
                active[run.name] = (run, proc, out, time.time(), cmd)
                log(f"{run.name}: started ({len(status) + len(active)}/{len(exp.runs)})")
            for name, (run, proc, out, t0, cmd) in list(active.items()):
                if proc.poll() is None:
                    continue
                out.close()
                del active[name]
                workdir, seconds = os.path.join(root, name), time.time() - t0
                if proc.returncode == 0 and completed(workdir, exp.stage):
                    mark_done(workdir, run, cmd, seconds)
                    status[name] = "finished"
                    log(f"{name}: finished in {seconds:.0f}s")
                else:
                    status[name] = "interrupted" if proc.returncode == PREEMPTED else f"failed (exit {proc.returncode})"
                    log(f"{name}: {status[name]}; see {os.path.join(workdir, 'sweep.log')}")
            time.sleep(0.2)
    except KeyboardInterrupt:
        log("interrupted: asking the running runs to checkpoint and stop (rerun the sweep to resume)")
        for _, proc, *_ in active.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc, *_ in active.values():
            proc.wait()
        raise SystemExit(PREEMPTED) from None
    return status


# --- launch files ------------------------------------------------------------------------------------


def emit_slurm(
    exp: Experiment, root: str, nodes: int, sbatch: list[str], max_parallel: int, grace_s: int, max_requeues: int
) -> str:
    """A SLURM array job, one task per unfinished run; each task is `srun` over `nodes` nodes, one process
    per node (rlhf_jax.distributed joins them when SLURM_NTASKS > 1).

    Preemption: `grace_s` seconds before the time limit SLURM sends USR1 to the task's script, which SIGTERMs the
    run (it saves and exits 143) and requeues the task with `scontrol requeue`, at most `max_requeues` times. A
    preemption, node failure or `scontrol requeue` SIGTERMs the run directly and SLURM requeues the task itself
    (--requeue). Either way the task reruns the same command, which resumes from the run's last checkpoint; a run
    that stopped unfinished exits non-zero, so SLURM never records it as completed."""
    runs, launch = _unfinished(exp, root)
    array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"# {exp.name}: {len(runs)} runs of {exp.base}. Submit with: sbatch {launch}/sweep.sbatch",
        f"#SBATCH --job-name={exp.name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={launch}/slurm-%A_%a.out",
        "#SBATCH --open-mode=append",  # a requeued task adds to its log
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{grace_s}",
    ]
    lines += [f"#SBATCH {s}" for s in sbatch]
    lines += ["set -uo pipefail  # not -e: the run's exit status decides below", f"cd {shlex.quote(ROOT)}"]
    lines += ["case $SLURM_ARRAY_TASK_ID in"]
    for i, run in enumerate(runs):
        workdir = os.path.join(root, run.name)
        cmd = shlex.join(command(exp, run, workdir, "python"))
        lines.append(f"  {i}) WORKDIR={shlex.quote(workdir)}; CMD=({cmd.replace('python', '${PYTHON:-python}', 1)}) ;;")
    # After its run, a task refreshes the summary (written atomically) and marks the run DONE.
    collect_cmd = shlex.join(["scripts/sweep.py", os.path.abspath(exp.path), "--root", root, "--collect"])
    lines += [
        "esac",
        'if [ -e "$WORKDIR/DONE.json" ]; then echo "$WORKDIR: finished earlier"; exit 0; fi',
        'echo "[$(date +%T)] job $SLURM_JOB_ID, attempt $((${SLURM_RESTART_COUNT:-0} + 1)): $WORKDIR"',
        "# USR1, before the time limit: SIGTERM the run's processes (not this script, nor srun: it kills them), which",
        "# save and exit 143; then requeue. SIGTERM (preemption, scontrol requeue, scancel) reached the run as well.",
        "TIME_LIMIT=0",
        "trap 'TIME_LIMIT=1; scancel --signal=TERM \"$SLURM_JOB_ID\"' USR1",
        "trap 'echo \"[$(date +%T)] SIGTERM: the run saves and stops\"' TERM",
        'srun "${CMD[@]}" &',
        "RUN=$!",
        'wait "$RUN"; STATUS=$?',
        'while kill -0 "$RUN" 2>/dev/null; do wait "$RUN"; STATUS=$?; done  # a trapped signal ends wait early',
        'if [ "$STATUS" -eq 0 ]; then exec ${PYTHON:-python} ' + collect_cmd + "; fi",
        f'if [ "$TIME_LIMIT" = 1 ] && [ "$STATUS" -eq {PREEMPTED} ]; then',
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ]; then',
        '    echo "[$(date +%T)] time limit: saved; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "  else",
        f'    echo "[$(date +%T)] time limit: saved; not requeued: {max_requeues} requeues already (--max-requeues); '
        'resubmit to resume."',
        "  fi",
        "fi",
        'exit "$STATUS"',
    ]
    path = os.path.join(launch, "sweep.sbatch")
    _write(path, lines)
    return path


def emit_tpu(exp: Experiment, root: str) -> str:
    """One command per unfinished run on a Cloud TPU pod slice: every host runs it (--worker=all) and
    RLHF_JAX_DISTRIBUTED=1 lets JAX find the slice's hosts. `root` must be storage every host sees."""
    runs, launch = _unfinished(exp, root)
    lines = [
        "#!/bin/bash",
        f"# {exp.name}: {len(runs)} runs of {exp.base}, one after another, each on the slice.",
        "#   TPU_NAME=my-v5e-32 ZONE=us-west4-a REPO='~/rlhf_jax' bash " + os.path.join(launch, "tpu_pod.sh"),
        "set -euo pipefail",
        ': "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"',
        'REPO="${REPO:-~/rlhf_jax}"',
        'remote() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all '
        '--command="cd $REPO && $1"; }',
    ]
    for run in runs:
        cmd = shlex.join(command(exp, run, os.path.join(root, run.name), "python3", quiet=False))
        lines += [f"# {run.name}", f"remote {shlex.quote('RLHF_JAX_DISTRIBUTED=1 ' + cmd)}"]
    path = os.path.join(launch, "tpu_pod.sh")
    _write(path, lines)
    return path


def emit_skypilot(
    exp: Experiment, root: str, accelerators: str, nodes: int, storage: str, spot: bool, max_restarts: int
) -> tuple[str, str]:
    """A SkyPilot task running the sweep, one run after another, on one cluster: a TPU slice (`accelerators`
    e.g. tpu-v5e-16: every host runs `run:`, JAX finds the slice) or `nodes` GPU nodes (e.g. H100:8:
    jax.distributed from SkyPilot's node variables). The sweep root is `storage`: a bucket (gs://, s3://, ...)
    mounted at /sweep, or a path every node shares. Under `sky jobs launch` a preempted spot cluster is replaced
    and `run:` starts over: runs with DONE.json are skipped and the interrupted one resumes from its last
    checkpoint. A sweep stopped by SIGTERM exits 143 and always recovers; other failures at most
    `max_restarts` times. Returns (task YAML path, launch command)."""
    tpu = accelerators.startswith("tpu-")
    if tpu and nodes != 1:
        raise SystemExit(f"--nodes {nodes}: a TPU slice ({accelerators}) is one SkyPilot node; pick a bigger slice.")
    bucket = "://" in storage
    remote_root = "/sweep" if bucket else storage
    launch = os.path.join(root, "launch")
    os.makedirs(launch, exist_ok=True)
    jax_req = f"jax[{'tpu' if tpu else 'cuda12'}]=={importlib.metadata.version('jax')}"  # this machine's JAX
    sweep_cmd = shlex.join(["python", "scripts/sweep.py", os.path.relpath(exp.path, ROOT), "--root", remote_root])
    run = ["set -u"]
    if tpu:
        run.append("export RLHF_JAX_DISTRIBUTED=1  # every host of the slice: JAX finds the others")
    elif nodes > 1:
        run += [
            "export RLHF_JAX_DISTRIBUTED=1",
            'export RLHF_JAX_COORDINATOR="$(echo "$SKYPILOT_NODE_IPS" | head -n1):8476"',
            'export RLHF_JAX_NUM_PROCESSES="$SKYPILOT_NUM_NODES" RLHF_JAX_PROCESS_ID="$SKYPILOT_NODE_RANK"',
        ]
    run.append(sweep_cmd)
    lines = [
        f"# {exp.name}: {len(exp.runs)} runs of {exp.base} on {accelerators} x {nodes}; the sweep root is {storage}.",
        f"name: {exp.name}",
        f"workdir: {json.dumps(ROOT)}",
        f"num_nodes: {nodes}",
        "resources:",
        f"  accelerators: {json.dumps(accelerators)}",
        f"  use_spot: {str(spot).lower()}",
        "  job_recovery:",
        "    strategy: EAGER_NEXT_REGION",
        f"    max_restarts_on_errors: {max_restarts}",
        f"    recover_on_exit_codes: [{PREEMPTED}]",
    ]
    if bucket:
        lines += ["file_mounts:", f"  {remote_root}:", f"    source: {json.dumps(storage)}", "    mode: MOUNT"]
    lines += [
        "setup: |",
        f"  pip install -e . {shlex.quote(jax_req)}",
        "run: |",
    ]
    lines += [f"  {line}" for line in run]
    path = os.path.join(launch, "skypilot.yaml")
    _write(path, lines, 0o644)
    return path, shlex.join(["sky", "jobs", "launch", "--name", exp.name, "--yes", path])


def _unfinished(exp: Experiment, root: str) -> tuple[list[Run], str]:
    runs = [r for r in exp.runs if not finished(os.path.join(root, r.name), exp.stage)]
    if not runs:
        raise SystemExit(f"every run of {exp.path} in {root} is finished; nothing to launch.")
    launch = os.path.join(root, "launch")
    os.makedirs(launch, exist_ok=True)
    return runs, launch


def _write(path: str, lines: list[str], mode: int = 0o755) -> None:
    """Whole file or nothing: concurrent writers (array tasks, hosts collecting) never interleave."""
    tmp = _tmp_beside(path)
    with open(tmp, "w", newline="") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _tmp_beside(path: str) -> str:
    """A new temporary file's name in path's directory, this writer's own."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    return tmp


# --- the summary -------------------------------------------------------------------------------------


def last_values(workdir: str, stage: str, average_last: int = 1) -> dict[str, Any]:
    """{metric: last logged value, or the mean of the last `average_last` numbers} from metrics.jsonl;
    for a pipeline, its summary.json flattened with '/'."""
    if stage == "pipeline":
        path = os.path.join(workdir, "summary.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return _flatten(json.load(f))
    history: dict[str, list] = {}
    for record in _records(workdir):
        for k, v in record.items():
            history.setdefault(k, []).append(v)
    out = {}
    for k, vs in history.items():
        tail = vs[-average_last:]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in tail)
        out[k] = sum(tail) / len(tail) if numeric and average_last > 1 else vs[-1]
    return out


def _records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # blank, or the line a running run is writing right now
                continue
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def collect(exp: Experiment, root: str) -> list[dict[str, Any]]:
    """One row per run: its name, swept values, status and the columns' last values ("" if never logged).
    Runs found complete (e.g. by a SLURM job) get their DONE.json here."""
    rows = []
    for run in exp.runs:
        workdir = os.path.join(root, run.name)
        if completed(workdir, exp.stage) and not os.path.isfile(os.path.join(workdir, DONE)):
            mark_done(workdir, run, command(exp, run, workdir, "python"), None)
        status = "finished" if finished(workdir, exp.stage) else ("started" if os.path.isdir(workdir) else "not run")
        values = last_values(workdir, exp.stage, exp.average_last)
        rows.append(
            {
                "run": run.name,
                **{k: run.swept.get(k, "") for k in exp.swept_keys},
                "status": status,
                **{c: values.get(c, "") for c in exp.columns},
            }
        )
    return rows


def write_summary(exp: Experiment, root: str, rows: list[dict[str, Any]]) -> list[str]:
    """summary.csv, summary.md and summary.png under root; returns their paths."""
    fields = ["run", *exp.swept_keys, "status", *exp.columns]
    csv_path, md_path = os.path.join(root, "summary.csv"), os.path.join(root, "summary.md")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write(csv_path, [table.getvalue().rstrip("\n")], 0o644)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    what = f"mean of the last {exp.average_last} logged values" if exp.average_last > 1 else "last logged values"
    lines = [
        f"# {exp.name}",
        "",
        f"{len(rows)} runs of `{exp.base}` ({exp.path}); {what}.",
        "",
        "| " + " | ".join(fields) + " |",
        "|" + "---|" * len(fields),
    ]
    lines += ["| " + " | ".join(fmt(r[k]) for k in fields) + " |" for r in rows]
    lines += ["", "![summary](summary.png)"]
    if exp.analyze is not None and any(r["status"] == "finished" for r in rows):
        lines += [""] + list(exp.analyze(root, rows))
    _write(md_path, lines, 0o644)
    return [csv_path, md_path, plot(exp, root, rows)]


def plot(exp: Experiment, root: str, rows: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = exp.columns[:3]
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    # x axis: the first swept key with several numeric values; one line per setting of the other keys
    x_key = next((k for k in exp.swept_keys if len({r[k] for r in rows}) > 1 and all(is_num(r[k]) for r in rows)), None)
    others = [k for k in exp.swept_keys if k != x_key]
    curves = exp.stage != "pipeline" and bool(columns)
    fig, axes = plt.subplots(1, len(columns) + curves, figsize=(4.2 * (len(columns) + curves), 3.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        done = [r for r in rows if is_num(r[col])]
        if x_key:
            lines: dict[str, list] = {}
            for r in sorted(done, key=lambda r: r[x_key]):
                lines.setdefault(",".join(f"{k.split('.')[-1]}={r[k]}" for k in others), []).append(r)
            for label, rs in lines.items():
                ax.plot([r[x_key] for r in rs], [r[col] for r in rs], "o-", label=label or None)
            xs = [r[x_key] for r in done]
            if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
                ax.set_xscale("log")
            ax.set_xlabel(x_key)
            if len(lines) > 1:
                ax.legend(fontsize=6)
        else:
            ax.plot(range(len(done)), [r[col] for r in done], "o")
            ax.set_xticks(range(len(done)), [r["run"] for r in done], rotation=45, ha="right", fontsize=7)
        ax.set_title(col, fontsize=9)
    if curves:
        ax = axes[0][-1]
        for r in rows:
            points = [
                (m["step"], m[columns[0]])
                for m in _records(os.path.join(root, r["run"]))
                if isinstance(m.get(columns[0]), (int, float))
            ]
            if points:
                ax.plot(*zip(*points), label=r["run"])
        ax.set_xlabel("step")
        ax.set_title(f"{columns[0]} during training", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"{exp.name}: {exp.base}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(root, "summary.png")
    tmp = _tmp_beside(path)
    fig.savefig(tmp, dpi=110, format="png")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    plt.close(fig)
    return path


# --- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="experiments/<name>.py")
    p.add_argument("--root", help="directory of the runs' workdirs (default runs/sweeps/<name>)")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (local, or a SLURM array's limit)")
    p.add_argument(
        "--emit", choices=("slurm", "tpu", "skypilot"), help="write launch files under <root>/launch instead of running"
    )
    p.add_argument("--collect", action="store_true", help="only write the summary of what has run")
    p.add_argument("--list", action="store_true", help="print each run's command and state, run nothing")
    p.add_argument("--nodes", type=int, default=1, help="--emit slurm/skypilot: nodes (processes) per run")
    p.add_argument("--sbatch", action="append", default=[], help="--emit slurm: an extra #SBATCH option, repeatable")
    p.add_argument(
        "--grace", type=int, default=120, help="--emit slurm: seconds before the time limit to save and requeue"
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=10,
        help="--emit slurm: a task requeues itself at its time limit while requeued fewer times than this; "
        "skypilot: restarts after a failure other than preemption",
    )
    p.add_argument("--accelerators", default="tpu-v5e-16", help="--emit skypilot: e.g. tpu-v5e-16, H100:8")
    p.add_argument(
        "--storage", help="--emit skypilot: the sweep root: a bucket (gs://b/path, s3://...) or a path all nodes share"
    )
    p.add_argument("--on-demand", action="store_true", help="--emit skypilot: on-demand instead of spot")
    p.add_argument("--python", default=sys.executable, help="interpreter for local runs")
    a = p.parse_args(argv)
    if a.workers < 1 or a.nodes < 1:
        p.error("--workers and --nodes must be at least 1")
    if a.grace < 1 or a.max_requeues < 0:
        p.error("--grace must be at least 1 second and --max-requeues at least 0")
    if a.emit == "skypilot" and not a.storage:
        p.error("--emit skypilot needs --storage: a bucket (e.g. gs://my-bucket/sweeps/kl) or a path all nodes share")
    exp = load_experiment(a.experiment)
    root = os.path.abspath(a.root or os.path.join("runs", "sweeps", exp.name))
    if a.list:
        for run in exp.runs:
            workdir = os.path.join(root, run.name)
            state = "finished" if finished(workdir, exp.stage) else "to run"
            print(f"{state:9s} {shlex.join(command(exp, run, workdir, 'python'))}")
        return 0
    if a.emit == "slurm":
        path = emit_slurm(exp, root, a.nodes, a.sbatch, a.workers if a.workers > 1 else 0, a.grace, a.max_requeues)
        log(f"wrote {path}; submit with: sbatch {path}")
    elif a.emit == "tpu":
        log(f"wrote {emit_tpu(exp, root)}")
    elif a.emit == "skypilot":
        path, launch_cmd = emit_skypilot(exp, root, a.accelerators, a.nodes, a.storage, not a.on_demand, a.max_requeues)
        log(f"wrote {path}; launch with:")
        print(launch_cmd)
    if a.emit:
        return 0
    os.makedirs(root, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a launcher's SIGTERM stops the runs as Ctrl-C does
    status = {} if a.collect else run_local(exp, root, a.workers, a.python)
    rows = collect(exp, root)
    for path in write_summary(exp, root, rows):
        log(f"wrote {path}")
    failed = {k: v for k, v in status.items() if v != "finished"}
    if failed:
        log(f"{len(failed)} of {len(exp.runs)} runs did not finish: {failed}")
    if failed and all(v == "interrupted" for v in failed.values()):
        return PREEMPTED  # stopped by SIGTERM, saved: a launcher reruns the sweep, which resumes
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
