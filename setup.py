"""Package discovery for setuptools (everything else is in pyproject.toml).

Every package under fastspec/ is found automatically; the top-level kernels/ folder (and any subpackage it
grows) is installed under the import name fastspec.kernels, which `[tool.setuptools.packages.find]` cannot
express.
"""
from setuptools import find_packages, setup

KERNELS = ["fastspec.kernels"] + [f"fastspec.kernels.{p}" for p in find_packages("kernels")]

setup(
    packages=find_packages(include=["fastspec", "fastspec.*"]) + KERNELS,
    package_dir={"fastspec.kernels": "kernels"},
)
