"""rlhf_jax: a JAX-native RLHF research framework."""

import setuptools

setuptools.setup(
    name="rlhf_jax",
    version="0.1.0",
    description="JAX-native RLHF: SFT, reward modelling and PPO with pure, jitted, sharded functions.",
    packages=setuptools.find_packages(include=["rlhf_jax", "rlhf_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "chex>=0.1.92",
        "absl-py>=2.1",
        "ml-collections>=1.1",
        # transformers gives tokenizers and configs; safetensors reads/writes weights without pickle.
        "transformers>=5.0,<6",
        "safetensors>=0.5",
        "numpy>=2.0",
        # Run outputs: TensorBoard event files without TensorFlow, PNG curves.
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # The embedded default task's simulated labeler: 7,500 human-rated words (VADER lexicon).
        "vaderSentiment==3.3.2",
    ],
    extras_require={
        # torch is only a reference for parity tests, never a runtime dependency. Pinned to the
        # CPU wheel that lies on disk here so pip never pulls a multi-GB CUDA build.
        # peft: the reference that LoRA adapter directories are checked against (its loader and
        # LoRA layers on the transformers model); it pulls accelerate, not another torch.
        "test": ["torch==2.13.0", "pytest>=8", "pytest-xdist>=3.5", "datasets>=3", "pyarrow>=15",
                 "peft==0.21.2"],
        # Parquet and datasets-on-disk prompt/preference files.
        "data": ["datasets>=3", "pyarrow>=15"],
    },
)
