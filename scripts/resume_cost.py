"""What a resume costs before its first step: `Run.setup_state` + `restore_or` on a pretraining model of about
134M parameters (d 1024, 10 blocks, vocabulary 8,192; f32 params + Adam moments, 1.6 GB), in a fresh process,
with its time and the process's peak RSS.

    python scripts/resume_cost.py            # saves step 0 to a temporary workdir, then resumes it 2 times

The save runs in its own process, so each resume's peak RSS is its own.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(mode: str, workdir: str):
    sys.path.insert(0, ROOT)
    import jax

    from configs import pretrain
    from rlhf_jax.run import Run

    c = pretrain.get_config("default")
    c.model.update(d_model=1024, n_layers=10, n_heads=16, max_len=128, dropout=0.0, vocab_size=8192)
    c.data.seq_len = 128
    run = Run(c, workdir)
    t = time.perf_counter()
    state = run.setup_state().state
    if mode == "save":
        run.save(state, {"step": 0}, force=True)
        print(f"saved {sum(x.size for x in jax.tree.leaves(state.params)):,} params")
    else:
        state, _ = run.restore_or(state)
        jax.block_until_ready(state)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"resume: setup + restore {time.perf_counter() - t:.1f} s, peak RSS {peak:.2f} GiB")
    run.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("MODE", "WORKDIR"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        return _child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ["save"] + ["resume"] * args.repeats:
            out = subprocess.run([sys.executable, __file__, "--child", mode, tmp], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
