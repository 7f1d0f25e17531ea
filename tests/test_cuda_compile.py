"""CUDA sources compile for sm_80, sm_89 and sm_90 (compile only: no GPU is needed or used)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_compile_for_sm80_sm89_and_sm90():
    r = subprocess.run(["bash", str(ROOT / "tools" / "check_cuda.sh"), "80", "89", "90"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for arch in (80, 89, 90):  # warnings (spills included) are errors there
        assert f"ok   csrc/cuda/compact_kernels.cu sm_{arch}" in r.stdout
