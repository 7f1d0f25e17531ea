"""CUDA sources compile for sm_80 and sm_90 (compile only: no GPU is needed or used)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_compile_for_sm80_and_sm90():
    r = subprocess.run(["bash", str(ROOT / "tools" / "check_cuda.sh"), "80", "90"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   csrc/cuda/compact_kernels.cu sm_80" in r.stdout
    assert "ok   csrc/cuda/compact_kernels.cu sm_90" in r.stdout
