"""Checkpoints: orbax CheckpointManager with three items per step.

    <workdir>/checkpoints/<step>/params   the model params (what a later stage loads)
    <workdir>/checkpoints/<step>/state    the rest of the train state (opt_state, step, rng, extras)
    <workdir>/checkpoints/<step>/meta     JSON: data position, stage, anything a resume needs

Orbax writes each step into a temporary directory and renames it when the
save is complete, so a kill mid-save never leaves a half-written "latest".
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhf_jax.errors import MissingFileError

# Orbax lets the replicas of a replicated array share its writing ("replica-parallel"): each slices its part
# of the shard on device, one small compiled program per array shape and slice, a few ms each, for each of a
# model's hundreds of arrays (3 s of a tiny model's first save here). For a small array that costs more than
# splitting its write saves, so only arrays whose per-replica part is at least this big are split; the
# others are written whole by one replica. The bytes on disk are the same either way.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20


def _register_array_handler():
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that it replaces its default jax.Array handler
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array,
            ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES),
            override=True,
        )
    finally:
        logging.set_verbosity(level)


_register_array_handler()


def _abstract(tree):
    """ShapeDtypeStructs carrying the target shardings: restore lands already sharded."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, workdir: str, keep: int, use_async: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        # A save cut off by a kill stays a temporary directory, never a step; the next start removes it.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=use_async
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("params", "state", "meta"))
        # That removal runs in a background thread, which a save would wait for. Wait now (a directory listing):
        # a run stopping before its first save (a config error) must not exit under the thread, which then fails
        # with a second traceback. Orbax has no public call for it; without it, the thread is left to finish.
        wait_for_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_cleanup is not None:
            wait_for_cleanup()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, state, meta: dict[str, Any], force: bool = False) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, params_like, state_like):
        """Restores into the shardings of `params_like` / `state_like` (any topology)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            state=ocp.args.StandardRestore(_abstract(state_like)),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # orbax raises many types; the user needs the path and a way out
            others = [s for s in self.manager.all_steps() if s != step]
            raise RuntimeError(
                f"Checkpoint {self.directory}/{step} could not be restored ({type(e).__name__}: {e}). "
                f"It is corrupt or from a different model/config. Delete that directory to resume from an "
                f"earlier step {others or '(none left: the run restarts)'}, or use a fresh --workdir."
            ) from e
        return out["params"], out["state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def find_params_checkpoint(path: str) -> tuple[str, int]:
    """Resolves `init_from` (a workdir, its checkpoints/ dir, or one step dir) to (checkpoints dir, step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "params")):  # a step dir
        return os.path.dirname(path), int(os.path.basename(path))
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise MissingFileError(
            f"init_from={path!r}: no finished checkpoint found (looked for {ckpt_dir}/<step>/params). "
            f"Run the earlier stage to completion first, or point init_from at its --workdir."
        )
    return ckpt_dir, steps[-1]


def load_params(path: str, params_like):
    """Loads the params item of an earlier stage's checkpoint into `params_like`'s shardings."""
    ckpt_dir, step = find_params_checkpoint(path)
    with ocp.CheckpointManager(ckpt_dir, item_names=("params", "state", "meta")) as mngr:
        try:
            out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like))))
        except Exception as e:
            raise RuntimeError(
                f"init_from: params at {ckpt_dir}/{step} do not fit this model ({type(e).__name__}: {e}). "
                f"The model config must match the earlier stage's (see its config.json)."
            ) from e
    return out["params"]


def load_base_params(path: str, params_like):
    """An earlier stage's params as the start of this one: with LoRA there, its adapters merged into its
    weights (W + (alpha / r) · A @ B); with LoRA here, the adapters of `params_like` (fresh) kept as they are.
    So this stage's base, and hence its reference policy, is the earlier stage's model as it ran."""
    from rlhf_jax import lora
    from rlhf_jax.models.layers import LoraConfig, ModelConfig

    saved = LoraConfig(**((read_run_config(path) or {}).get("model") or {}).get("lora", {}))
    target = lora.without_adapters(params_like)
    if saved.rank:
        target = lora.with_saved_adapters(target, saved)
    loaded = load_params(path, target)
    if saved.rank:
        loaded = lora.merged(loaded, ModelConfig(lora=saved))
    return lora.with_adapters_of(loaded, params_like)


def read_run_config(path: str) -> dict | None:
    """The config.json of the workdir that holds `path` (a workdir or a checkpoint inside one)."""
    f = os.path.join(workdir_of(path), "config.json")
    if not os.path.exists(f):
        return None
    with open(f) as fh:
        return json.load(fh)


def workdir_of(path: str) -> str:
    """The workdir that holds `path` (init_from may name a workdir, its checkpoints/ dir or one step dir),
    found by its config.json; `path` itself when there is none (e.g. an HF model directory)."""
    path = os.path.abspath(path)
    for cand in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.exists(os.path.join(cand, "config.json")):
            return cand
    return path
