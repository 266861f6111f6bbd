from setuptools import find_packages, setup

setup(
    name="trilemma_moe",
    version="0.1.0",
    description=("Dynamic expert clustering with structured compression for MoE training "
                 "(arXiv 2510.02345) as a DeepSpeed / Megatron-core plugin"),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trilemma_moe", "trilemma_moe.*"]),
    # A range, not a pin: cluster users keep the CUDA build of torch they already have.
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm", "tensorboard"],
    extras_require={
        "deepspeed": ["deepspeed>=0.14"],
        # 0.12 has every API the integration uses; 0.17+ needs Python >= 3.12 (pip picks 0.16.1 on 3.11).
        # Install it with torch on the same pip line (torch==2.13.0 on these CPU machines), else pip may
        # pull a CUDA build of torch.
        "megatron": ["megatron-core>=0.12"],
        # Hugging Face MoE models (integrations/hf.py); DeepSpeed 0.19's AutoEP, which the tests and
        # benchmarks run beside ours, works with transformers <= 5.22 (5.23 changed the output-recorder
        # registry AutoEP rewrites). accelerate: transformers' Trainer.
        "hf": ["transformers==5.22.2", "accelerate>=1.10"],
        # The documentation site (docs/, Sphinx with MyST Markdown) and its browser test (selenium drives
        # Debian's chromium through chromium-driver; no browser download).
        "docs": ["sphinx>=8,<9", "myst-parser>=4", "furo>=2024.8", "selenium>=4.20"],
        "plots": ["matplotlib"],
        # CUDA builds of torch bring a matching triton; the fused path uses it when present.
        "gpu": ["triton"],
        # triton here runs the GPU kernels through Triton's interpreter on the CPU; that
        # interpreter breaks on numpy >= 2.4 (1-element arrays as loop bounds).
        "test": ["pytest", "pytest-timeout", "matplotlib",
                 "triton; platform_system == 'Linux' and platform_machine == 'x86_64'", "numpy<2.4"],
    },
    entry_points={"console_scripts": ["trilemma-moe=trilemma_moe.cli:main"]},
)
