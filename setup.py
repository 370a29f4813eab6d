import re
from pathlib import Path

from setuptools import find_packages, setup

# One version, in the package itself.
VERSION = re.search(
    r'^__version__ = "([^"]+)"', Path("megatron_densemixer/__init__.py").read_text(), re.M
).group(1)

setup(
    name="megatron-densemixer",
    version=VERSION,
    license="Apache-2.0",
    description="DenseMixer router gradients for Megatron Core MoE layers",
    packages=find_packages(include=["megatron_densemixer", "megatron_densemixer.*"]),
    python_requires=">=3.10",
    install_requires=["megatron-core>=0.16,<0.20", "torch", "packaging"],
    extras_require={"test": ["pytest", "ruff"]},
)
