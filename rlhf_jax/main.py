"""One entry point for every stage; `config.stage` picks it.

    python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain
    python -m rlhf_jax.main --config=configs/sft.py:tiny --workdir=runs/sft \
        --config.init_from=runs/pretrain --config.optim.lr=1e-4

Rerunning the same command resumes from the latest checkpoint in --workdir. An error the user can fix
(rlhf_jax.errors.UserError) prints as one line and exits with status 1; a bug keeps its traceback.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import cli
from rlhf_jax.stages import run_stage

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/sft.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from absl import logging

    from rlhf_jax import distributed

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    distributed.initialize()
    run_stage(_CONFIG.value, _WORKDIR.value)  # a config error, a missing file or a diverged run: cli.run reports it


if __name__ == "__main__":
    import sys

    from rlhf_jax.config import check_renamed_flags

    check_renamed_flags(sys.argv)  # an old key fails naming its new name, before absl's "no such key"
    cli.run(main)
