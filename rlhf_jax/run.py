"""What every stage's run holds and nothing more: the validated config, the workdir, the mesh, the
checkpointer (resume / init_from / save) and the SIGTERM guard; and the preamble every stage shares once its
data is built: `setup_state` (config.json, model, optimizer, sharded train state), then `restore_or`.

The loop itself stays in the stage module, readable top to bottom; its shared tail (logging,
evaluation, checkpoints, preemption) is `rlhf_jax.loop.LoopTail`. The run's tokenizer is
`Run.tokenizer` (it sizes config.model.vocab_size), the memory report `perf.compile_with_memory_report`,
the non-finite policy `train_state.NonFiniteGuard`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from rlhf_jax import checkpoint, config as config_lib, distributed, hf, lora, optim, parallel, perf, train_state
from rlhf_jax.errors import ConfigError, MissingFileError, WorkdirError
from rlhf_jax.metrics import MetricWriter, import_wandb
from rlhf_jax.models.gpt import TransformerLM

# Model fields a stage may change when it starts from an earlier stage's params (LoRA adapters are the
# stage's own: its base weights are that stage's params); everything else describes the architecture
# and is taken from that stage.
RUNTIME_MODEL_FIELDS = ("dropout", "dtype", "remat", "lora")

# The exit status of a run stopped by SIGTERM once it has saved: the shell's 128 + SIGTERM, as if the signal had
# killed it, so a launcher (SLURM, SkyPilot, scripts/sweep.py) never reads an unfinished run as done.
PREEMPTED_EXIT = 128 + signal.SIGTERM


class StageSetup(NamedTuple):
    """`Run.setup_state`'s result: the model, the optimizer, its learning-rate schedule (update → lr), the fresh
    train state and its shardings."""

    model: TransformerLM
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    state: train_state.TrainState
    shardings: train_state.TrainState


class Run:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config = ml_collections.ConfigDict(config.to_dict())  # our own unlocked copy
        if config.init_from and os.path.exists(config.init_from):  # (a missing one: validate names it)
            check_init_from(config.init_from)  # fail now, not after building data
            adopt_model_config(config)  # init_from's architecture, so settings such as LoRA's are checked on it
        config_lib.validate(config)
        perf.compilations()  # count this process's compilations, and return the heap each one frees to the OS
        self.workdir = os.path.abspath(workdir)
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise WorkdirError(
                f"--workdir={workdir!r} is an existing file, not a directory. Pass a new or "
                f"existing directory for this run's checkpoints and metrics."
            )
        os.makedirs(self.workdir, exist_ok=True)
        config_lib.check_seq_len(config)  # against init_from's position table, when it has one
        self.config = config
        self.mesh = parallel.make_mesh({a: config.mesh[a] for a in parallel.MESH_AXES})
        self.rules = parallel.rules_from_config(config.mesh.rules)
        parallel.check_batch(config.batch_size, self.mesh, self.rules)
        parallel.check_batch(
            config.batch_size // config.grad_accum,
            self.mesh,
            self.rules,
            "config.batch_size / config.grad_accum (the microbatch)",
        )
        self.is_main = jax.process_index() == 0
        if config.log.wandb and self.is_main:
            import_wandb()  # a missing wandb fails now, not after the data and the first compilation
        self.preempted = False
        self.nonfinite = train_state.NonFiniteGuard(config.nonfinite, self.log)
        self._prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None

    @functools.cached_property
    def ckpt(self) -> checkpoint.Checkpointer:
        """This workdir's checkpoints, opened on first use (`restore_or`), after the checks a stage runs first:
        orbax starts a thread there, which would fail loudly at exit if the run stopped before it finished."""
        c = self.config.checkpoint
        return checkpoint.Checkpointer(self.workdir, c.keep, c.use_async)

    # --- config -------------------------------------------------------------------------------
    def write_config(self):
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(self.config.to_dict(), f, indent=2, default=str)

    def main_first(self, fn, *args, **kwargs):
        """Runs fn on process 0, then on the others (which then find its cached output, e.g. a built dataset)."""
        import absl.logging
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
        verbosity = absl.logging.get_verbosity()
        absl.logging.set_verbosity(absl.logging.ERROR)  # tfds warns about every custom builder config
        try:
            if self.is_main:
                out = fn(*args, **kwargs)
            distributed.sync(f"main_first:{getattr(fn, '__name__', 'fn')}")
            if not self.is_main:
                out = fn(*args, **kwargs)
        finally:
            absl.logging.set_verbosity(verbosity)
        return out

    def tokenizer(self, corpus_paths: list[str]):
        """This run's tokenizer, copied to <workdir>/tokenizer.model; sizes config.model.vocab_size when it is -1.

        Order: config.data.tokenizer_path; the init_from workdir's tokenizer (for an HF model
        directory: its tokenizer.model, else its tokenizer.json); one already in this workdir
        (resume); else train one on `corpus_paths`. A tokenizer.json is copied under the same
        name, with its tokenizer_config.json beside it: `load_tokenizer` tells the formats apart
        by content. Process 0 writes; every process then loads the copy.
        """
        import shutil

        from rlhf_jax.data.tokenizer import load_tokenizer, tokenizer_file_in, train_tokenizer

        c, workdir = self.config, self.workdir
        dest = os.path.join(workdir, "tokenizer.model")
        src = c.data.get("tokenizer_path", "")
        if src and not os.path.exists(src):
            raise MissingFileError(
                f"config.data.tokenizer_path={src!r} does not exist. Point it at a tokenizer.model "
                f"or tokenizer.json (or leave it empty to use init_from's or train one)."
            )
        if not src and c.init_from:
            src = tokenizer_file_in(checkpoint.workdir_of(c.init_from))
            if src is None:
                raise MissingFileError(
                    f"config.init_from: no tokenizer.model (or tokenizer.json) in "
                    f"{checkpoint.workdir_of(c.init_from)}; set config.data.tokenizer_path."
                )
        if src:
            if self.is_main and os.path.abspath(src) != dest:
                loaded = load_tokenizer(src)
                shutil.copyfile(loaded.path, dest + ".tmp")
                os.replace(dest + ".tmp", dest)
                special = os.path.join(os.path.dirname(loaded.path), "tokenizer_config.json")
                if loaded.kind == "hf" and os.path.exists(special):
                    shutil.copyfile(special, os.path.join(workdir, "tokenizer_config.json"))
        elif not os.path.exists(dest) and self.is_main:
            train_tokenizer(corpus_paths, dest, vocab_size=c.data.vocab_size, model_type=c.data.tokenizer_type)
        distributed.sync("tokenizer")
        tok = load_tokenizer(dest)
        if c.model.vocab_size <= 0:  # size the embedding from the tokenizer, padded for sharding
            c.model.vocab_size = -(-tok.vocab_size // 128) * 128
        elif c.model.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"config.model.vocab_size={c.model.vocab_size} < tokenizer size {tok.vocab_size}; "
                f"set it to -1 to size it from the tokenizer."
            )
        if c.model.vocab_size > tok.vocab_size:  # padded rows are masked out of every softmax (ModelConfig)
            c.model.token_vocab = tok.vocab_size
        return tok

    # --- params and state ----------------------------------------------------------------------
    def load_init_params(self, params, heads=("trunk", "lm_head")):
        """Replaces `heads` (top-level params entries) with the init_from checkpoint's."""
        if not self.config.init_from:
            return params
        if hf.is_hf_dir(self.config.init_from):  # read straight into the shardings of `params`
            loaded = hf.load_params(self.config.init_from, params)
        else:
            loaded = checkpoint.load_base_params(self.config.init_from, params)
        return {k: (loaded[k] if k in heads else v) for k, v in params.items()}

    def frozen_init_params(self, params_like, heads: tuple[str, ...], under: str | None = None):
        """The init_from params of `heads` (of `params_like[under]`, where given) as a frozen reference (e.g. the
        SFT policy of PPO's KL or DPO's ratio): a copy, so no buffer is shared with a train state that is donated.
        Heads without an init_from are the seed's initialisation: on a resume, where `params_like` is abstract
        (setup_state), those leaves alone are computed here, with the fresh run's values."""
        like = params_like[under] if under else params_like
        params = self.load_init_params(like, heads=heads)
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        if not any(isinstance(x, jax.ShapeDtypeStruct) for _, x in leaves):
            return jax.tree.map(jnp.copy, params)
        # A resume: the leaves still abstract get the fresh run's values, and only they are computed.
        prefix = f"[{under!r}]" if under else ""
        given = {prefix + jax.tree_util.keystr(path): x for path, x in leaves if isinstance(x, jax.Array)}
        return train_state.init_params_given(self._init_params, self.mesh, self.rules, given, under)

    def setup_state(
        self,
        init: Callable | None = None,
        *,
        updates_per_step: int = 1,
        members: int = 0,
        extras: dict | None = None,
        start: Callable | None = None,
    ) -> StageSetup:
        """What every stage builds once its data has sized the vocabulary: config.json (the config is final),
        the model, the optimizer (its schedule over optim.total_steps, -1: num_steps, times updates_per_step
        updates; with LoRA on, lora.optimizer's trainable leaves only: the adapters and the heads) and the sharded
        train state (`restore_or` then resumes it where a checkpoint exists). init(model) → a function giving the
        boxed params; default: every head of one model. members, extras: train_state.create's. start: where a
        fresh run's params begin, as train_state.create takes it (e.g. `self.init_heads(("trunk", "lm_head"))`);
        not called when this workdir has a checkpoint to resume from."""
        c = self.config
        self.write_config()
        model = TransformerLM(config_lib.model_config(c))
        total = c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps
        tx, schedule = optim.make_optimizer(c.optim, total * updates_per_step)
        tx = lora.optimizer(tx, model.cfg)
        init_params = init(model) if init is not None else train_state.model_init_fn(model, c.data.seq_len, c.seed)
        self._init_params = init_params
        if self.ckpt.latest_step() is not None:
            # A resume: restore_or fills every leaf, so the state is abstract until then (its shapes, dtypes and
            # shardings). Nothing is initialised only to be overwritten: no init program, and no second copy of
            # the train state in memory beside the restored one.
            state, shardings = train_state.abstract_state(
                init_params, tx, self.mesh, self.rules, c.seed, extras=extras, members=members
            )
        else:
            state, shardings = train_state.create(
                init_params, tx, self.mesh, self.rules, c.seed, extras=extras, members=members, start=start
            )
        return StageSetup(model, tx, schedule, state, shardings)

    def init_heads(self, heads: tuple[str, ...]) -> Callable:
        """setup_state's `start` for params whose `heads` (top-level entries) begin from config.init_from."""
        return lambda like: self.load_init_params(like, heads=heads)

    def restore_or(self, state):
        """(state, meta) from the latest checkpoint of this workdir, or (state, None) for a fresh run."""
        step = self.ckpt.latest_step()
        if step is None:
            return state, None
        params, rest, meta = self.ckpt.restore(step, state.params, state.rest())
        self.log(f"resumed from {self.ckpt.directory}/{step}")
        self.nonfinite.resumed(rest)
        return state.replace(params=params).with_rest(rest), meta

    def save(self, state, meta: dict, force: bool = False):
        """Saves `state` — never one that has seen a non-finite update under config.nonfinite="stop"."""
        self.check_finite(state)
        step = int(jax.device_get(state.step))
        self.ckpt.save(step, state.params, state.rest(), meta, force=force)

    def check_finite(self, state):
        """config.nonfinite's policy on updates skipped since the last check (train_state.NonFiniteGuard)."""

        def last_good():
            self.ckpt.wait()
            latest = self.ckpt.latest_step()
            self._release()
            return f"{self.ckpt.directory}/{latest}" if latest is not None else "none (the run restarts from scratch)"

        self.nonfinite.check(state, last_good)

    # --- loop helpers -------------------------------------------------------------------------
    def metric_writer(self, resume_step: int) -> MetricWriter:
        return MetricWriter(self.workdir, resume_step, config=self.config)

    def progress(self, start: int, total: int, desc: str):
        return tqdm(
            total=total,
            initial=start,
            desc=desc,
            disable=not (self.is_main and self.config.progress),
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def log(self, msg: str):
        if self.is_main:
            tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")

    def _release(self):
        if "ckpt" in self.__dict__:  # opened
            self.ckpt.close()
        if self._prev_handler is not None:
            signal.signal(signal.SIGTERM, self._prev_handler)
            self._prev_handler = None

    def _on_sigterm(self, signum, frame):
        self.preempted = True

    def stop_requested(self) -> bool:
        """Whether to save and stop after this step: SIGTERM reached this process, or, in a multi-process run, any
        process. Hosts get the signal at different steps, or only one of them does, but the save is collective, so
        every process must stop after the same step: they agree on it at every step (a one-int all-gather)."""
        if jax.process_count() > 1:
            votes = multihost_utils.process_allgather(np.int32(self.preempted))
            self.preempted = bool(np.any(votes))
        return self.preempted

    def close(self):
        """Waits for checkpoints. After SIGTERM, exits the process with PREEMPTED_EXIT (143) — never returns as if
        the stage had finished (a pipeline must not mark a preempted stage done); rerunning the command resumes."""
        self._release()
        if self.preempted:
            raise SystemExit(PREEMPTED_EXIT)


def check_init_from(path: str) -> None:
    """init_from holds params: a Hugging Face model directory with its weights, or a run's finished checkpoint."""
    if hf.is_hf_dir(path):
        return
    config_json = os.path.join(path, "config.json")
    if os.path.isfile(config_json):
        with open(config_json) as f:
            if "model_type" in json.load(f):  # a Hugging Face model's config, not a run's
                raise MissingFileError(
                    f"config.init_from={path!r}: the Hugging Face model's weights are missing: its config.json has "
                    f"neither model.safetensors nor model.safetensors.index.json (with its shards) beside it. Copy "
                    f"the weight files there, or point init_from at a complete model directory."
                )
    checkpoint.find_params_checkpoint(path)


def adopt_model_config(config) -> None:
    """Sets config.model's architecture from init_from: an earlier stage's config.json, or an HF model's
    (its config.json mapped onto our fields; an unsupported model fails here, naming the field)."""
    if hf.is_hf_dir(config.init_from):
        model = hf.model_fields(hf.read_config(config.init_from), os.path.join(config.init_from, "config.json"))
    else:
        src = checkpoint.read_run_config(config.init_from)
        if src is None:
            raise MissingFileError(
                f"config.init_from={config.init_from!r}: no config.json found there or "
                f"above; point init_from at an earlier stage's --workdir or at a Hugging "
                f"Face model directory (config.json + model.safetensors)."
            )
        model = src["model"]
    for k, v in model.items():
        if k not in RUNTIME_MODEL_FIELDS:
            config.model[k] = v


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
