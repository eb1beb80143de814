"""What every stage's loop needs and nothing more: validated config, workdir
outputs, mesh, tokenizer, checkpoints (resume / init_from) and a SIGTERM guard.

The loop itself stays in the stage module, readable top to bottom.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import jax
import ml_collections
from tqdm import tqdm

from rlhf_jax import checkpoint, config as config_lib, hf, parallel
from rlhf_jax.metrics import MetricWriter

# Model fields a stage may change when it starts from an earlier stage's params;
# everything else describes the architecture and is taken from that stage.
RUNTIME_MODEL_FIELDS = ("dropout", "dtype", "remat")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under config.nonfinite="stop"; the message names the step and checkpoint."""


class Run:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config = ml_collections.ConfigDict(config.to_dict())  # our own unlocked copy
        config_lib.validate(config)
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        if config.init_from:
            if not hf.is_hf_dir(config.init_from):
                checkpoint.find_params_checkpoint(config.init_from)  # fail now, not after building data
            self._adopt_model_config(config)
        self.config = config
        self.mesh = parallel.make_mesh({a: config.mesh[a] for a in parallel.MESH_AXES})
        self.rules = parallel.rules_from_config(config.mesh.rules)
        parallel.check_batch(config.batch_size, self.mesh, self.rules)
        parallel.check_batch(config.batch_size // config.grad_accum, self.mesh, self.rules,
                             "config.batch_size / config.grad_accum (the microbatch)")
        self.is_main = jax.process_index() == 0
        self.ckpt = checkpoint.Checkpointer(self.workdir, config.checkpoint.keep, config.checkpoint.use_async)
        self.preempted = False
        self._nonfinite_seen = 0  # skipped updates already reported (the count restored with a checkpoint)
        self._prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None

    # --- config -------------------------------------------------------------------------------
    def _adopt_model_config(self, config):
        """The architecture comes from init_from: an earlier stage's config.json, or an HF model's
        (its config.json mapped onto our fields; an unsupported model fails here, naming the field)."""
        if hf.is_hf_dir(config.init_from):
            model = hf.model_fields(hf.read_config(config.init_from), os.path.join(config.init_from, "config.json"))
        else:
            src = checkpoint.read_run_config(config.init_from)
            if src is None:
                raise FileNotFoundError(f"config.init_from={config.init_from!r}: no config.json found there or "
                                        f"above; point init_from at an earlier stage's --workdir or at a Hugging "
                                        f"Face model directory (config.json + model.safetensors).")
            model = src["model"]
        for k, v in model.items():
            if k not in RUNTIME_MODEL_FIELDS:
                config.model[k] = v

    def write_config(self):
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(self.config.to_dict(), f, indent=2, default=str)

    # --- tokenizer ----------------------------------------------------------------------------
    def tokenizer(self, corpus_paths: list[str]):
        """The run's tokenizer, copied to <workdir>/tokenizer.model.

        Order: config.data.tokenizer_path; the init_from workdir's tokenizer (for an HF model
        directory: its tokenizer.model, else its tokenizer.json); one already in this workdir
        (resume); else train one on `corpus_paths`. A tokenizer.json is copied under the same
        name, with its tokenizer_config.json beside it: `load_tokenizer` tells the formats apart
        by content.
        """
        from rlhf_jax.data import tokenizer as tok_lib

        c, dest = self.config, os.path.join(self.workdir, "tokenizer.model")
        src = c.data.get("tokenizer_path", "")
        if not src and c.init_from:
            src = tok_lib.tokenizer_file_in(_workdir_of(c.init_from))
            if src is None:
                raise FileNotFoundError(f"config.init_from: no tokenizer.model (or tokenizer.json) in "
                                        f"{_workdir_of(c.init_from)}; set config.data.tokenizer_path.")
        if src:
            if self.is_main and os.path.abspath(src) != dest:
                loaded = tok_lib.load_tokenizer(src)
                shutil.copyfile(loaded.path, dest + ".tmp")
                os.replace(dest + ".tmp", dest)
                special = os.path.join(os.path.dirname(loaded.path), "tokenizer_config.json")
                if loaded.kind == "hf" and os.path.exists(special):
                    shutil.copyfile(special, os.path.join(self.workdir, "tokenizer_config.json"))
        elif not os.path.exists(dest) and self.is_main:
            tok_lib.train_tokenizer(corpus_paths, dest, vocab_size=c.data.vocab_size,
                                    model_type=c.data.tokenizer_type)
        _sync("tokenizer")
        tok = tok_lib.load_tokenizer(dest)
        if c.model.vocab_size <= 0:  # size the embedding from the tokenizer, padded for sharding
            c.model.vocab_size = -(-tok.vocab_size // 128) * 128
        elif c.model.vocab_size < tok.vocab_size:
            raise ValueError(f"config.model.vocab_size={c.model.vocab_size} < tokenizer size {tok.vocab_size}; "
                             f"set it to -1 to size it from the tokenizer.")
        return tok

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
            _sync(f"main_first:{getattr(fn, '__name__', 'fn')}")
            if not self.is_main:
                out = fn(*args, **kwargs)
        finally:
            absl.logging.set_verbosity(verbosity)
        return out

    # --- params and state ----------------------------------------------------------------------
    def load_init_params(self, params, heads=("trunk", "lm_head")):
        """Replaces `heads` (top-level params entries) with the init_from checkpoint's."""
        if not self.config.init_from:
            return params
        if hf.is_hf_dir(self.config.init_from):  # read straight into the shardings of `params`
            loaded = hf.load_params(self.config.init_from, params)
        else:
            loaded = checkpoint.load_params(self.config.init_from, params)
        return {k: (loaded[k] if k in heads else v) for k, v in params.items()}

    def restore_or(self, state):
        """(state, meta) from the latest checkpoint of this workdir, or (state, None) for a fresh run."""
        step = self.ckpt.latest_step()
        if step is None:
            return state, None
        params, rest, meta = self.ckpt.restore(step, state.params, state.rest())
        self.log(f"resumed from {self.ckpt.directory}/{step}")
        self._nonfinite_seen = int(jax.device_get(rest["nonfinite"])[0])
        return state.replace(params=params).with_rest(rest), meta

    def save(self, state, meta: dict, force: bool = False):
        """Saves `state` — never one that has seen a non-finite update under config.nonfinite="stop"."""
        self.check_finite(state)
        step = int(jax.device_get(state.step))
        self.ckpt.save(step, state.params, state.rest(), meta, force=force)

    def check_finite(self, state):
        """Acts on updates skipped for a non-finite loss or gradient since the last check (config.nonfinite).

        Called where the loop already syncs with the device (logging) and before every save.
        """
        count, first = (int(v) for v in jax.device_get(state.nonfinite))
        if count <= self._nonfinite_seen:
            return
        new, self._nonfinite_seen = count - self._nonfinite_seen, count
        if self.config.nonfinite == "skip":
            self.log(f"WARNING: {new} update(s) skipped for a non-finite loss or gradient "
                     f"({count} in this run so far, the first at step {first}); params and optimizer state "
                     f"were left unchanged (config.nonfinite=skip).")
            return
        self.ckpt.wait()
        latest = self.ckpt.latest_step()
        self._release()
        good = f"{self.ckpt.directory}/{latest}" if latest is not None else "none (the run restarts from scratch)"
        raise NonFiniteError(
            f"Non-finite loss or gradient at step {first} ({count} update(s) skipped by step "
            f"{int(jax.device_get(state.step))}); stopped without saving. Last good checkpoint: {good}. "
            f"Fix the cause (a lower --config.optim.lr, --config.optim.grad_clip_norm, bad data) and rerun the same "
            f"command to resume from that checkpoint, or set --config.nonfinite=skip to skip such updates.")

    # --- compilation and memory ---------------------------------------------------------------
    def compile(self, name: str, jitted, state, *args):
        """Compiles `jitted(state, *args)` ahead of time and returns the executable the loop then calls (one
        compile, not two). Logs once, and writes to <workdir>/memory.json, the per-device bytes of the params
        and optimizer state and the compiled step's memory (arguments, outputs, temporaries, donated)."""
        t0 = time.perf_counter()
        compiled = jitted.lower(state, *args).compile()
        report = {"name": name, "compile_s": round(time.perf_counter() - t0, 2), "devices": jax.device_count(),
                  "mesh": dict(self.mesh.shape),
                  "params_bytes_per_device": parallel.per_device_bytes(state.params),
                  "opt_state_bytes_per_device": parallel.per_device_bytes(state.opt_state)}
        stats = compiled.memory_analysis()  # per device; None on backends that do not report it
        if stats is not None:
            for key in ("argument", "output", "temp", "alias", "generated_code"):
                report[f"step_{key}_bytes"] = int(getattr(stats, f"{key}_size_in_bytes"))
            # Live at once: inputs + outputs + scratch, less the outputs written into donated inputs.
            report["step_total_bytes"] = (report["step_argument_bytes"] + report["step_output_bytes"]
                                          + report["step_temp_bytes"] - report["step_alias_bytes"])
        mib = lambda b: f"{b / 2**20:.1f} MiB"
        msg = (f"{name} per device: params {mib(report['params_bytes_per_device'])}, optimizer state "
               f"{mib(report['opt_state_bytes_per_device'])}")
        if stats is not None:
            msg += (f"; compiled step {mib(report['step_total_bytes'])} (arguments {mib(report['step_argument_bytes'])}"
                    f", outputs {mib(report['step_output_bytes'])}, temporaries {mib(report['step_temp_bytes'])}, "
                    f"donated {mib(report['step_alias_bytes'])})")
        self.log(f"{msg}; compiled in {report['compile_s']:.1f}s")
        if self.is_main:
            path = os.path.join(self.workdir, "memory.json")
            with open(path + ".tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(path + ".tmp", path)
        return compiled

    # --- loop helpers -------------------------------------------------------------------------
    def metric_writer(self, resume_step: int) -> MetricWriter:
        return MetricWriter(self.workdir, resume_step)

    def progress(self, start: int, total: int, desc: str):
        return tqdm(total=total, initial=start, desc=desc, disable=not (self.is_main and self.config.progress),
                    dynamic_ncols=True, mininterval=1.0)

    def log(self, msg: str):
        if self.is_main:
            tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")

    def _release(self):
        self.ckpt.close()
        if self._prev_handler is not None:
            signal.signal(signal.SIGTERM, self._prev_handler)
            self._prev_handler = None

    def _on_sigterm(self, signum, frame):
        self.preempted = True

    def close(self):
        """Waits for checkpoints. After SIGTERM, exits the process with status 0 — never returns as if the
        stage had finished (a pipeline must not mark a preempted stage done)."""
        self._release()
        if self.preempted:
            raise SystemExit(0)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _workdir_of(path: str) -> str:
    """init_from may name a workdir, its checkpoints/ dir or one step dir (or an HF model directory)."""
    path = os.path.abspath(path)
    for cand in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.exists(os.path.join(cand, "config.json")):
            return cand
    return path


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
