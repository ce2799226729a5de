"""Every CUDA source compiles for sm_80 and sm_90, and ptxas reports no register spills.

Needs nvcc (on PATH or under CUDA_HOME), not a GPU; skipped without nvcc.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def find_nvcc() -> str | None:
    """nvcc on PATH, else under ``$CUDA_HOME/bin`` (where setup.py looks too), else None."""
    cuda_home = os.environ.get("CUDA_HOME")
    return shutil.which("nvcc") or (shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) if cuda_home else None)


NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or under CUDA_HOME")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda path: path.name)
def test_compiles_without_spills(source, arch, tmp_path):
    command = [NVCC, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-Xptxas", "-v", str(source), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed:\n{report}"
    spills = SPILLS.findall(report)
    assert spills, f"ptxas printed no spill report:\n{report}"
    assert all(stores == loads == "0" for stores, loads in spills), f"ptxas reports spills:\n{report}"
