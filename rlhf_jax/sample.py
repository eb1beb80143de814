"""Sample from a trained policy, or chat with it, through the jitted KV-cache sampler the stages use.

    python -m rlhf_jax.sample --workdir=runs/quickstart --prompt="sort: 5 2 9" --prompt="add: 3 4"
    python -m rlhf_jax.sample --workdir=runs/quickstart/sft --prompts_path=prompts.jsonl --out=samples.jsonl
    python -m rlhf_jax.sample --workdir=models/smollm2 --chat          # one user turn a line; /reset, /exit

--workdir: a stage's workdir (pretrain, SFT, a policy-gradient or DPO policy), a pipeline run's (its policy
stage), or a Hugging Face model directory. Prompts are rendered in the run's own chat format
(config.data.chat_template / chat_system; an HF directory's own template when it has one), left-padded to
--max_prompt_len (longer ones lose their oldest turns, never the last), and each response stops at that
format's end of turn. Sample i of a call draws with the key fold_in(PRNGKey(--seed), i); --temperature=0 is
greedy. --prompts_path takes the stages' prompt formats (one JSON object a line: {"prompt"} or {"messages"});
the output JSONL keeps each record's fields and adds "response".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from rlhf_jax.errors import ConfigError, UserError


def policy_dir(workdir: str) -> str:
    """The policy a --workdir names: a pipeline run's policy stage (stages.json), else the directory itself."""
    stages = os.path.join(workdir, "stages.json")
    if os.path.isfile(stages):
        with open(stages) as f:
            return json.load(f)["policy"]
    return workdir


def run_template(path: str, tok, name: str = "", system: str | None = None):
    """The chat template a run trained in (its config.data), or an HF directory's own ("checkpoint" when its
    tokenizer_config.json has one, else "plain"); `name` / `system` override them."""
    from rlhf_jax import checkpoint, hf
    from rlhf_jax.data import chat

    data = {}
    if not hf.is_hf_dir(path):
        data = dict((checkpoint.read_run_config(path) or {}).get("data", {}))
    else:
        config = os.path.join(os.path.dirname(tok.path), "tokenizer_config.json")
        has_own = False
        if os.path.isfile(config):
            with open(config) as f:
                has_own = bool(json.load(f).get("chat_template"))
        data["chat_template"] = "checkpoint" if has_own else "plain"
    if name:
        data["chat_template"] = name
    if system is not None:
        data["chat_system"] = system
    return chat.config_template(data)


class Sampler:
    """One policy, one compiled sampler: `responses(dialogues, seed)` for any number of prompts."""

    def __init__(self, workdir: str, max_new_tokens: int, temperature: float, max_prompt_len: int, batch_size: int,
                 template: str = "", system: str | None = None, dtype: str = ""):  # fmt: skip
        from rlhf_jax import parallel, perf, sampling, trained

        perf.compilations()  # as a stage's Run does: the heap each compilation frees goes back to the OS
        path = policy_dir(workdir)
        self.mesh, self.rules = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}), parallel.DEFAULT_RULES
        self.model, params, self.tok = trained.load_policy(path, self.mesh, self.rules, dtype=dtype or None)
        self.params = sampling.inference_params(params, self.model.cfg)  # bf16 weights with --dtype=bfloat16
        del params
        self.template = run_template(path, self.tok, template, system)
        # 0: what the model's positions leave after the response, at most 256 (every prompt is padded to it)
        self.max_prompt_len = max_prompt_len or min(256, self.model.cfg.max_len - max_new_tokens)
        if self.max_prompt_len + max_new_tokens > self.model.cfg.max_len or self.max_prompt_len < 2:
            raise ConfigError(
                f"--max_prompt_len={self.max_prompt_len} plus --max_new_tokens={max_new_tokens} exceed the model's "
                f"{self.model.cfg.max_len} positions; lower one of them."
            )
        # a multiple of the data-parallel shards: one compiled shape, whatever the number of prompts
        n = parallel.data_parallel_size(self.mesh, self.rules)
        self.batch_size = -(-batch_size // n) * n
        settings = trained.sampling_settings(self.tok, max_new_tokens, temperature, self.template)
        self.fn = jax.jit(lambda p, t, m, k: sampling.sample(p, t, m, k, model=self.model, settings=settings))

    def responses(self, dialogues: list[list[dict[str, str]]], seed: int = 0) -> list[str]:
        """The response to each dialogue (its messages end with a user turn), in order."""
        from rlhf_jax import parallel, sampling
        from rlhf_jax.data import prompts

        rows = [prompts.prompt_example(d, self.tok, self.max_prompt_len, template=self.template)[0] for d in dialogues]
        out = []
        with parallel.activate(self.mesh, self.rules):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                chunk = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # filler rows, dropped below
                keys = sampling.example_keys(seed, np.arange(start, start + self.batch_size))
                g = parallel.global_batch(
                    {
                        "t": np.stack([r["prompt_tokens"] for r in chunk]),
                        "m": np.stack([r["prompt_mask"] for r in chunk]),
                        "k": keys,
                    },
                    self.mesh,
                    self.rules,
                )
                r = jax.device_get(self.fn(self.params, g["t"], g["m"], g["k"]))
                for tokens, mask, ended in list(zip(r["tokens"], r["mask"], r["ended"]))[: len(rows) - start]:
                    ids = tokens[mask > 0].tolist()
                    out.append(self.tok.decode(ids[:-1] if ended else ids))  # without the end-of-turn token
        return out


def chat(sampler: Sampler, lines, write, seed: int = 0) -> None:
    """A conversation: each line of `lines` is a user turn (/reset forgets the history, /exit ends); the
    history goes back in with every turn, cut from its oldest turns to --max_prompt_len."""
    history: list[dict[str, str]] = []
    for turn, line in enumerate(lines):
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            history = []
            write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply = sampler.responses([history], seed=seed + turn)[0]
        history.append({"role": "assistant", "content": reply})
        write(reply + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a stage's or pipeline's workdir, or an HF model directory")
    ap.add_argument("--prompt", action="append", default=[], help="a user turn to answer (repeatable)")
    ap.add_argument("--prompts_path", default="", help="a JSONL of prompts ({'prompt'} or {'messages'})")
    ap.add_argument("--out", default="", help="with --prompts_path: the JSONL to write (default: stdout)")
    ap.add_argument("--chat", action="store_true", help="interactive: one user turn a line from stdin")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    ap.add_argument("--max_prompt_len", type=int, default=0, help="default: the model's positions left, at most 256")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat_template", default="", help="override the run's config.data.chat_template")
    ap.add_argument("--system", default=None, help="override the run's system message ('' for none)")
    ap.add_argument(
        "--dtype",
        default="",
        help="compute dtype (default: the run's, bfloat16 for an HF directory); float32 decodes the same tokens "
        "on any number of devices, where bf16 rounding can change a greedy choice",
    )
    args = ap.parse_args(argv)
    if sum(map(bool, (args.prompt, args.prompts_path, args.chat))) != 1:
        ap.error("give exactly one of --prompt (repeatable), --prompts_path or --chat")
    try:
        run(args)
    except (UserError, FileNotFoundError, ValueError) as e:  # messages name the file / flag and the fix
        sys.exit(f"error: {e}")


def run(args, sampler=None) -> None:
    """The command; `sampler`: a Sampler made from the flags when None."""
    sampler = sampler or Sampler(
        args.workdir,
        args.max_new_tokens,
        args.temperature,
        args.max_prompt_len,
        args.batch_size,
        args.chat_template,
        args.system,
        args.dtype,
    )
    if args.chat:
        if sys.stdin.isatty():
            print(f"chatting with {policy_dir(args.workdir)}; /reset clears the history, /exit or Ctrl-D ends")
        chat(sampler, sys.stdin, lambda s: (sys.stdout.write(s), sys.stdout.flush()), args.seed)
        return
    if args.prompt:
        records = [{"prompt": p} for p in args.prompt]
        dialogues = [[{"role": "user", "content": p}] for p in args.prompt]
    else:
        from rlhf_jax.data import prompts

        read = prompts.read_prompts(args.prompts_path, "prompt")
        with open(args.prompts_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        dialogues = [r["messages"] for r in read]
    # sample j of prompt i is sample i * n + j of the call: its own key
    texts = sampler.responses([d for d in dialogues for _ in range(args.n)], seed=args.seed)
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        out.write(format_samples(records, texts, args.n, jsonl=bool(args.prompts_path)))
    finally:
        if args.out:
            out.close()


def format_samples(records: list[dict], texts: list[str], n: int, jsonl: bool) -> str:
    """JSONL: each record with its "response" (n lines a record); else the responses as text, each under a
    "--- prompt i, sample j" line when there are several (a response may run over lines)."""
    if jsonl:
        return "".join(
            json.dumps({**r, "response": texts[i * n + j]}) + "\n" for i, r in enumerate(records) for j in range(n)
        )
    if len(texts) == 1:
        return texts[0] + "\n"
    return "".join(f"--- prompt {i}, sample {j}\n{texts[i * n + j]}\n" for i in range(len(records)) for j in range(n))


if __name__ == "__main__":
    main()
