"""Build milkernels: the pure-Python package, plus the CUDA extension ``milkernels._C`` when nvcc is found.

The extension is built by CMake (``CMakeLists.txt``). Without nvcc (on PATH or under CUDA_HOME) it
is skipped with one line and the package still works on its other backends; with nvcc a failed
build fails the install.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc() -> str | None:
    """Path of nvcc on PATH, else under ``$CUDA_HOME/bin``, else None."""
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    cuda_home = os.environ.get("CUDA_HOME")
    candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    return str(candidate) if candidate is not None and candidate.is_file() else None


class CMakeBuild(build_ext):
    """Builds each extension with CMake, or skips them all when nvcc is missing."""

    def run(self):
        self.nvcc = find_nvcc()
        if self.nvcc is None:
            print("milkernels: nvcc not found (PATH, CUDA_HOME): skipping the CUDA extension milkernels._C; "
                  "installing the pure-Python package", file=sys.stderr)
            return
        super().run()

    def build_extension(self, ext):
        """Configure and build with CMake, writing the module where setuptools expects ``ext``."""
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)  # configure afresh; objects stay reusable
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir),
                        f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
                        f"-DPython_EXECUTABLE={sys.executable}",
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)


setup(ext_modules=[Extension("milkernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
