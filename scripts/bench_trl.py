"""The TRL side of scripts/bench.py's GRPO comparison: `trl.GRPOTrainer` on a Hugging Face GPT-2.

Started by scripts/bench.py as a worker process (`--worker grpo --spec JSON`); not meant to be run by
hand. bench.py writes the shared inputs (the tokenizer.json both systems use, the prompts) and gives
the shape and settings, so both run the same GRPO iteration: the same model shape and initial
weights' distribution, G samples of each prompt, prompt and response lengths, temperature, reward
function (rlhf_jax.rewards.fraction_of_vowels on the decoded text), β = 0.04 with the reference model,
and one optimizer update per batch of rollouts (num_iterations = 1, steps_per_generation = 1).
Prints one JSON line: the wall time of every training step (a step is generation + rewards + reference
log-probs + the update) and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from bench_harness import peak_rss_mib, protocol_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trl_grpo(spec: dict) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, ROOT)
    from rlhf_jax.rewards import fraction_of_vowels

    s, inputs = spec["shape"], spec["inputs"]
    tok = PreTrainedTokenizerFast(
        tokenizer_file=inputs["tokenizer"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=s["max_len"],
        n_embd=s["d_model"],
        n_layer=s["n_layers"],
        n_head=s["n_heads"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with open(inputs["prompts"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]

    def reward(prompts, completions, **kwargs):
        return [float(x) for x in fraction_of_vowels(prompts, completions, None, None)]

    reward.__name__ = "fraction_of_vowels"
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")  # the trainer builds its reference model from a path
        GPT2LMHeadModel(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        args = GRPOConfig(
            output_dir=os.path.join(tmp, "out"),
            per_device_train_batch_size=s["batch"],
            num_generations=s["group"],
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=s["new_tokens"],
            temperature=s["temperature"],
            beta=s["beta"],
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            learning_rate=s["lr"],
            lr_scheduler_type="constant",
            max_steps=s["iterations"],
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=spec["dtype"] == "bfloat16",
            disable_dropout=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=model_dir,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tok,
            callbacks=[StepTimer()],
        )
        trainer.train()
    return {"step_s": times, "peak_rss_mib": peak_rss_mib(), "trl": __import__("trl").__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", required=True, choices=("grpo",))
    ap.add_argument("--spec", default="{}")
    a = ap.parse_args()
    proto = protocol_stream()
    proto.write(json.dumps(trl_grpo(json.loads(a.spec))) + "\n")


if __name__ == "__main__":
    main()
