"""The torch side of scripts/bench.py --only real: TRL's GRPOTrainer and DPOTrainer, transformers' `generate` and
a forward + backward, on SmolLM2-135M-Instruct from the same HF directory our importer wrote.

Started by scripts/bench.py as a worker process (`--worker serve|grpo|dpo --spec JSON`); not meant to be run by
hand. The inputs are bench_real_workloads.py's files and sizes, so both systems run the same prompts, pairs,
G, response length, β and dtype policy. Settings that change the work, not the method, are set to match ours:
no gradient checkpointing (TRL's default recomputes the forward in the backward; ours does not), full
fine-tuning with a frozen reference copy, one update per batch of rollouts, the reference's log-probs computed
in every step (precompute_ref_log_probs=False).
  float32   f32 weights and compute;
  bfloat16  GRPO, DPO and forward + backward: f32 weights with bf16 autocast (`bf16=True`), our policy;
            generate: the model loaded in bf16 (`dtype=torch.bfloat16`: weights and KV cache), torch's fastest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable

from bench_harness import ROOT, Stepper, StopBench, full_length_sampling, serve
from bench_real_workloads import STEP_WARMUP, generate_prompt, grpo_messages, read_pairs


def _torch():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # the cores JAX's CPU backend uses: all of them
    return torch


def _model(spec: dict, dtype=None):
    from transformers import AutoModelForCausalLM

    torch = _torch()
    return AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=dtype or torch.float32, attn_implementation="sdpa"
    )


def torch_generate(spec: dict) -> Callable[[], None]:
    torch = _torch()
    s, B, N = spec["shape"], spec["batch"], spec["shape"]["new_tokens"]
    model = _model(spec, torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32).eval()
    V = model.config.vocab_size
    prompt = torch.from_numpy(generate_prompt(s, B, V)).long()
    kw = full_length_sampling(torch.ones_like(prompt), s["temperature"], N, model.config.pad_token_id)

    def run():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(prompt, **kw)
        assert tuple(out.shape) == (B, s["prompt_len"] + N), tuple(out.shape)

    return run


def torch_fwdbwd(spec: dict) -> Callable[[], None]:
    import numpy as np

    torch = _torch()
    import torch.nn.functional as F

    s = spec["shape"]
    model = _model(spec).train()
    V = model.config.vocab_size
    tokens = torch.from_numpy(np.random.default_rng(0).integers(4, V, (s["batch"], s["seq_len"] + 1))).long()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if spec["dtype"] == "bfloat16" else contextlib.nullcontext()

    def run():
        model.zero_grad(set_to_none=True)
        with amp:
            logits = model(input_ids=inputs).logits
        F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1)).backward()  # loss in f32, as ours

    return run


def _common(spec: dict, tmp: str) -> dict:
    """TrainingArguments both trainers share."""
    return dict(
        output_dir=os.path.join(tmp, "out"),
        learning_rate=spec["shape"]["lr"],
        lr_scheduler_type="constant",
        max_steps=STEP_WARMUP + spec["runs"] + 1,  # one more than the driver asks for: it never ends on its own
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=spec["dtype"] == "bfloat16",
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )


def _pausing_callback(stepper: Stepper, log_keys: tuple[str, ...]):
    """Pauses at the end of every optimizer step (after generation, scoring and the update) for the driver;
    replies with the previous step's logged `log_keys` (TRL logs a step after its end)."""
    from transformers import TrainerCallback

    class Pause(TrainerCallback):
        logs: dict = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            Pause.logs = {k: float(v) for k, v in (logs or {}).items() if k in log_keys}

        def on_step_end(self, args, state, control, **kwargs):
            stepper.pause(Pause.logs)

    return Pause()


def _train(make_trainer):
    stepper = Stepper()
    stepper.start()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            make_trainer(tmp, stepper).train()
        except StopBench:
            pass
    sys.stdout.flush()
    os._exit(0)


def trl_grpo(spec: dict):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, ROOT)
    from rlhf_jax.tasks.builtin import gold_reward

    s = spec["shape"]
    prompts = grpo_messages(spec["inputs"]["prompts"])

    def gold(prompts, completions, **kwargs):
        # The task's judge reads the instruction (the user turn) and the response text, as ours does.
        users = [next(m["content"] for m in p if m["role"] == "user") for p in prompts]
        return [float(x) for x in gold_reward(users, [c[0]["content"] for c in completions], None, None)]

    def make(tmp, stepper):
        args = GRPOConfig(
            per_device_train_batch_size=s["prompts"] * s["group"],  # completions per step
            num_generations=s["group"],
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=s["new_tokens"],
            temperature=s["temperature"],
            top_k=0,
            beta=s["beta"],
            loss_type="grpo",
            disable_dropout=True,
            **_common(spec, tmp),
        )
        return GRPOTrainer(
            model=spec["model_dir"],
            reward_funcs=gold,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left"),
            callbacks=[_pausing_callback(stepper, ("completions/mean_length",))],
        )

    _train(make)


def trl_dpo(spec: dict):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    s = spec["shape"]
    pairs = read_pairs(spec["inputs"]["pairs"])
    data = {
        "prompt": [p["prompt"] for p in pairs],
        "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in pairs],
    }

    def make(tmp, stepper):
        args = DPOConfig(
            per_device_train_batch_size=s["pairs"],
            beta=s["beta"],
            max_length=spec["seq_len"],  # our preset's data.seq_len: the same truncation limit
            precompute_ref_log_probs=False,
            **_common(spec, tmp),
        )
        return DPOTrainer(
            model=spec["model_dir"],
            args=args,
            train_dataset=Dataset.from_dict(data),
            processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
            callbacks=[_pausing_callback(stepper, ())],
        )

    _train(make)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", required=True, choices=("serve", "grpo", "dpo"))
    ap.add_argument("--spec", default="{}")
    a = ap.parse_args()
    spec = json.loads(a.spec)
    if a.worker == "grpo":
        trl_grpo(spec)
    elif a.worker == "dpo":
        trl_dpo(spec)
    else:
        import transformers  # noqa: F401  (import before saying hello, so imports are never timed)

        _torch()
        serve({"generate": torch_generate, "fwdbwd": torch_fwdbwd}, lambda: {}, warmup=1)


if __name__ == "__main__":
    main()
