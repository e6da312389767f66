"""Installable package for muddit_jax (``pip install -e .[torch,dev]``)."""
from setuptools import find_packages, setup

setup(
    name="muddit_jax",
    version="0.1.0",
    description="JAX/Flax TPU-native reimplementation of Muddit (unified discrete diffusion).",
    packages=find_packages(include=["muddit_jax", "muddit_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.10",
        "ml-collections>=0.1.1",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10",
        "scipy>=1.10",
        # datasets: TFDS builders written/read as ArrayRecord without TensorFlow, grain reader
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "array-record>=0.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # Porting PyTorch checkpoints and the parity tests. Install torch first with the
        # CPU build you want (pip picks up a locally cached wheel for `torch==2.13.0`).
        "torch": ["torch>=2.1", "diffusers>=0.30", "transformers>=4.40", "tokenizers>=0.19"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "pycocoevalcap>=1.2"],
    },
    entry_points={
        "console_scripts": [
            "muddit-convert=muddit_jax.cli.convert:main",
            "muddit-smoke=muddit_jax.cli.smoke:main",
            "muddit-sample=muddit_jax.cli.sample:main",
            "muddit-pretokenize=muddit_jax.cli.pretokenize:main",
            "muddit-train=muddit_jax.cli.train:main",
            "muddit-eval=muddit_jax.cli.eval:main",
        ]
    },
)
