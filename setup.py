"""sscell: self-supervised pretraining on single-cell gene expression, in JAX."""
from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="sscell",
    version="0.1.0",
    description="Self-supervised pretraining on single-cell gene expression at atlas scale (JAX/Flax).",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sscell", "sscell.*"]),
    package_data={"sscell.data": ["recipes/*.toml"]},  # census recipes (sscell.data.census)
    install_requires=requirements,
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", "moto[server]>=5.0", "s3fs>=2024.6",
                             "scanpy>=1.10", "ruff>=0.6", "scvi-tools>=1.2"],  # scanpy: its wheel
                             # ships the real cells tests/test_real_data.py uses; ruff: .ci/run lints with
                             # pyproject.toml's settings; scvi-tools: the scVI baseline's tests. Not tiledbsoma:
                             # it pins pandas < 3 (tests/test_census.py skips without it; CI runs it with [census])
                    "baselines": ["scvi-tools>=1.2"],  # the scVI evaluation baseline (skipped without it)
                    "remote": ["gcsfs>=2024.6", "s3fs>=2024.6"],  # stores on gs:// and s3://
                    "census": ["tiledbsoma>=1.15", "cellxgene-census>=1.15"],  # python -m sscell.data.census
                    # torch: the CPU build, pip install torch --index-url https://download.pytorch.org/whl/cpu;
                    # annbatch (Python >= 3.12) runs in its own venv
                    "bench": ["scDataset>=0.3", "torch>=2.4"]},
)
