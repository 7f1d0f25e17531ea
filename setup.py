# Placeholder build: pure Python. The CMake-driven native build (csrc/) is added by the build work.
from setuptools import setup

setup(
    packages=["inf_mllm", "inf_mllm.kernels"],
    package_dir={"inf_mllm": "inf_mllm", "inf_mllm.kernels": "kernels"},
)
