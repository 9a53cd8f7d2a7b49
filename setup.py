"""memo's build. `planner/` and `integrations/` install as memo.planner and memo.integrations."""

from setuptools import setup

setup(
    name="memo",
    version="0.1.0",
    description="Token-wise activation swapping, ring attention and planned memory for long-context training",
    python_requires=">=3.10",
    packages=["memo", "memo.swap", "memo.cli", "memo.planner", "memo.integrations"],
    package_dir={"memo.planner": "planner", "memo.integrations": "integrations"},
    install_requires=["torch>=2.6", "transformers>=4.56", "accelerate", "mip>=1.15", "safetensors", "numpy"],
    extras_require={
        "flash": ["flash-attn"],
        "deepspeed": ["deepspeed"],
        "dev": ["pytest", "matplotlib", "ninja"],
    },
    entry_points={"console_scripts": ["memo = memo.cli.main:main"]},
)
