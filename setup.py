"""Build of inf_mllm: pure-Python package plus the native library ``inf_mllm/_C`` (csrc/).

``build_ext`` drives CMake (CMakeLists.txt). The CPU kernels are always built; the CUDA
kernels when torch is a CUDA build (``torch.version.cuda``) and nvcc is found, unless
``INF_MLLM_NO_CUDA=1``. Environment knobs:

* ``INF_MLLM_NO_CUDA=1``: CPU library only.
* ``INF_MLLM_CUDA_ARCHS``: e.g. ``"90"`` or ``"80;90"`` (CMake syntax); else from
  ``TORCH_CUDA_ARCH_LIST`` (``"8.0;9.0+PTX"``), else the visible GPUs, else ``80;89;90``.
* ``CUDA_HOME`` / ``CUDA_PATH`` / ``nvcc`` on ``PATH``: the CUDA compiler.
* ``MAX_JOBS``: parallel compile jobs; ``CMAKE_BUILD_TYPE`` (default Release);
  ``INF_MLLM_CMAKE_ARGS``: extra CMake arguments.

CMake (>= 3.18) is the one build: ``pip install cmake`` if it is missing (``scripts/install.sh``
does; an isolated build gets it from ``pyproject.toml``).

``pip install --no-build-isolation -e .`` leaves ``inf_mllm/_C*.so`` in the source tree,
where ``inf_mllm/ops.py`` loads it.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def _cuda_archs(torch) -> str:
    archs = os.environ.get("INF_MLLM_CUDA_ARCHS")
    if archs:
        return archs
    tal = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if tal:
        out = []
        for a in re.split(r"[;\s,]+", tal.strip()):
            m = re.match(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$", a)
            if m:
                out.append(f"{m.group(1)}{m.group(2)}{m.group(3)}")
        if out:
            return ";".join(dict.fromkeys(out))
    try:
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return ";".join(f"{a}{b}" for a, b in sorted(caps))
    except Exception:  # pragma: no cover - no driver
        pass
    return "80;89;90"


def _find_cmake():
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as _cmake_pkg

            cmake = os.path.join(_cmake_pkg.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            return None
    return cmake


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = os.path.abspath(sourcedir)


class cmake_build_ext(build_ext):
    """Configure and build one CMake project per extension, writing the library where
    setuptools expects the extension (get_ext_fullpath); setuptools copies it into the
    source tree for editable / --inplace builds."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import torch  # build requirement (use --no-build-isolation with the target torch)
        import torch.utils

        fullpath = os.path.abspath(self.get_ext_fullpath(ext.name))
        outdir, fname = os.path.split(fullpath)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        name = fname[: -len(suffix)] if fname.endswith(suffix) else os.path.splitext(fname)[0]
        os.makedirs(outdir, exist_ok=True)

        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Debug" if self.debug else "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DINF_MLLM_OUTPUT_DIR={outdir}",
            f"-DINF_MLLM_OUTPUT_NAME={name}",
            f"-DINF_MLLM_OUTPUT_SUFFIX={suffix}",
        ]

        with_cuda = False
        if torch.version.cuda and not _env_flag("INF_MLLM_NO_CUDA"):
            nvcc = _find_nvcc()
            if nvcc:
                with_cuda = True
                archs = _cuda_archs(torch)
                args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DINF_MLLM_CUDA_ARCHS={archs}"]
                # Torch's CMake config reads TORCH_CUDA_ARCH_LIST; keep it consistent.
                os.environ.setdefault(
                    "TORCH_CUDA_ARCH_LIST", ";".join(f"{a[:-1]}.{a[-1]}" for a in archs.split(";") if a.isdigit())
                )
                cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
                # Torch's config finds CUDA with FindCUDA (CUDA_TOOLKIT_ROOT_DIR) and then
                # CUDAToolkit; point both at the toolkit of this nvcc.
                args += [f"-DCUDAToolkit_ROOT={cuda_home}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}"]
            else:
                print("inf_mllm: torch has CUDA but nvcc was not found; building the CPU kernels only", file=sys.stderr)
        args.append(f"-DINF_MLLM_WITH_CUDA={'ON' if with_cuda else 'OFF'}")

        if (torch.version.cuda and not with_cuda) or _env_flag("INF_MLLM_TORCH_MANUAL"):
            # Torch's CMake config would require the CUDA toolkit; locate torch by hand instead.
            from torch.utils import cpp_extension

            args += [
                "-DINF_MLLM_TORCH_MANUAL=ON",
                "-DINF_MLLM_TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()),
                f"-DINF_MLLM_TORCH_LIB_DIR={os.path.join(os.path.dirname(torch.__file__), 'lib')}",
                f"-DINF_MLLM_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            ]
        else:
            args.append(f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")

        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            if shutil.which("ninja"):
                args += ["-G", "Ninja"]
        args += shlex.split(os.environ.get("INF_MLLM_CMAKE_ARGS", ""))

        build_temp = os.path.join(os.path.abspath(self.build_temp), ext.name)
        os.makedirs(build_temp, exist_ok=True)
        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("inf_mllm: CMake (>= 3.18) is needed to build the native operators: pip install cmake")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "-S", ext.sourcedir, "-B", build_temp, *args])
        subprocess.check_call([cmake, "--build", build_temp, "--config", build_type, "-j", jobs])
        if not os.path.isfile(fullpath):
            raise RuntimeError(f"inf_mllm: CMake did not produce {fullpath}")


packages = ["inf_mllm", *find_packages(include=["inf_mllm.*"])]

setup(
    packages=packages,
    ext_modules=[CMakeExtension("inf_mllm._C")],
    cmdclass={"build_ext": cmake_build_ext},
    zip_safe=False,
)
