"""rlhf_jax: the InstructGPT / ChatGPT recipe (pretrain, SFT, RM, PPO) in JAX."""

from setuptools import find_packages, setup

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="Pretraining, SFT, reward modelling and PPO (RLHF) in JAX, sharded from day one.",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "sentencepiece>=0.2.1",
        "safetensors>=0.8.0",  # Hugging Face checkpoints in and out (numpy only)
        # An HF checkpoint's tokenizer.json and its Jinja chat template; pinned as requirements-lock.txt pins them
        # (jinja2 3.1.6 closes the sandbox escapes that chat templates, untrusted code, could use).
        "tokenizers==0.23.3",
        "jinja2==3.1.6",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "importlib_resources",  # tfds builders defined in package modules need it
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy",
        "tensorboardX",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # ipykernel: the notebook test's kernel; ruff: lint and format check (pyproject.toml); wandb: the optional
        # config.log.wandb logging, tested offline (pinned as requirements-test.txt pins it)
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "ruff", "wandb==0.31.0"],
        # torch is installed before transformers so that no CUDA build is pulled in.
        "parity": ["torch==2.13.0", "transformers", "tokenizers"],
        # `sky jobs launch` for scripts/sweep.py --emit skypilot. Not among the test extras: skypilot pins click<8.2,
        # which wandb and huggingface_hub exclude; the tests install its parser without that pin
        # (requirements-cloud-test.txt).
        "cloud": ["skypilot>=0.14"],
    },
)
