from setuptools import find_packages, setup

setup(
    name="megatron-densemixer",
    version="0.1.0",
    description="DenseMixer router gradients for Megatron Core MoE layers",
    packages=find_packages(include=["megatron_densemixer", "megatron_densemixer.*"]),
    python_requires=">=3.10",
    install_requires=["megatron-core>=0.16,<0.20", "torch", "packaging"],
    extras_require={"test": ["pytest", "ruff"]},
)
