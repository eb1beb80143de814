"""The tail every stage's loop shares, so a new stage writes only its own step:

    tail = LoopTail(run, start, "sft", tokens_per_step=B * L, flops_per_step=B * L * flops_per_token)
    for step, local in loader.iterate(start, c.num_steps - start):
        batch = parallel.global_batch(local, run.mesh, run.rules)
        step_fn = tail.compile_once("sft train step", step_fn, state, batch)
        state, metrics = step_fn(state, batch)
        if tail.end_step(step + 1, state, metrics, evaluate=lambda: evaluate(...)):
            break  # SIGTERM: saved; rerunning the same command resumes
    return tail.close()

After each step it does, in order: time the first (compiling) step apart from throughput; every
config.log_every steps (and at the last) fetch the metrics — the loop's only host sync — check
them for non-finite updates and write them with throughput (perf/tokens_per_sec,
perf/samples_per_sec, perf/mfu against this machine's measured peak, perf/step_time_s); every
config.eval_every steps (and at the last) evaluate; at the last step run `on_last` (e.g. the RM's
normalisation, which must exist before the final checkpoint); every config.checkpoint.every
steps, at the last and on SIGTERM save. Throughput counts only the steps timed since the last
log, evaluation or save.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

from rlhf_jax import perf


class LoopTail:
    def __init__(
        self,
        run,
        start: int,
        name: str,
        *,
        tokens_per_step: float = 0.0,
        samples_per_step: float = 0.0,
        flops_per_step: float = 0.0,
        postfix: dict[str, str] | None = None,
    ):
        """postfix: {label: metric} shown on the progress bar at each log step."""
        self.run, self.c, self.start, self.name = run, run.config, start, name
        self.tokens_per_step, self.samples_per_step, self.flops_per_step = (
            tokens_per_step,
            samples_per_step,
            flops_per_step,
        )
        self.peak = perf.measured_peak_flops(self.c.model.dtype) if flops_per_step else 0.0
        self.postfix = postfix or {}
        self.writer = run.metric_writer(start)
        self.bar = run.progress(start, self.c.num_steps, name)
        self.last: dict[str, Any] = {}
        self._compiled = False
        self._executables: dict[tuple, Any] = {}
        self._t, self._since = time.perf_counter(), 0

    def compile_once(self, name: str, jitted, *args):
        """The first call compiles `jitted(*args)` ahead of time (perf.compile_with_memory_report: memory.json);
        later calls return `jitted` as it is (by then, the compiled executable)."""
        if self._compiled:
            return jitted
        self._compiled = True
        return perf.compile_with_memory_report(
            name, jitted, args, args[0], self.run.mesh, self.run.workdir, self.run.log, self.run.is_main
        )

    def compiled_for(self, name: str, jitted, *args):
        """`jitted` compiled for the shapes of `args`, once per distinct set of shapes (a loop whose batches come
        in a few bucketed lengths); the first compilation writes the memory report, as compile_once."""
        key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))
        if key not in self._executables:
            if not self._executables:
                self._executables[key] = self.compile_once(name, jitted, *args)
            else:
                self._executables[key] = jitted.lower(*args).compile()
        return self._executables[key]

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Writes metrics at `step` (e.g. a stage's own extra record) and keeps them in `last`."""
        record = self.writer.write(step, metrics)
        self.last.update(record)
        return record

    def _reset_timer(self):
        self._t, self._since = time.perf_counter(), 0

    def end_step(
        self,
        done: int,
        state,
        metrics,
        evaluate: Callable[[], dict] | None = None,
        on_last: Callable[[], dict] | None = None,
    ) -> bool:
        """The tail of one step (module docstring); `done` = steps finished. True: stop (SIGTERM, saved)."""
        c, run = self.c, self.run
        final = done == c.num_steps
        self._since += 1
        self.bar.update(1)
        if done == self.start + 1:  # the first step compiles: time it apart from throughput
            jax.block_until_ready(state)
            run.log(f"{self.name}: compiled and ran the first step in {time.perf_counter() - self._t:.1f}s")
            self._reset_timer()
        if done % c.log_every == 0 or final:
            metrics = jax.device_get(metrics)
            run.check_finite(state)
            record = dict(metrics)
            if self._since:
                dt = time.perf_counter() - self._t
                if self.tokens_per_step:
                    record["perf/tokens_per_sec"] = self._since * self.tokens_per_step / dt
                if self.samples_per_step:
                    record["perf/samples_per_sec"] = self._since * self.samples_per_step / dt
                if self.flops_per_step:
                    record["perf/mfu"] = self._since * self.flops_per_step / dt / self.peak
                record["perf/step_time_s"] = dt / self._since
            self.write(done, record)
            if self.postfix:
                self.bar.set_postfix({k: f"{self.last[m]:.4g}" for k, m in self.postfix.items() if m in self.last})
            self._reset_timer()
        if evaluate is not None and (done % c.eval_every == 0 or final):
            ev = self.write(done, evaluate())
            run.log(
                f"step {done}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if k != "step" and isinstance(v, float))
            )
            self._reset_timer()
        if on_last is not None and final:
            self.write(done, on_last())
        stop = run.stop_requested()
        if done % c.checkpoint.every == 0 or final or stop:
            run.save(state, {"stage": c.stage, "data_step": done}, force=stop)
            self._reset_timer()
        if stop:
            run.log(f"SIGTERM: saved step {done}; rerun the same command to resume.")
            return True
        return False

    def close(self) -> dict[str, Any]:
        """Closes the progress bar, the writer and the run (waiting for checkpoints); the last metrics."""
        self.bar.close()
        self.writer.close()
        self.run.close()
        return self.last
