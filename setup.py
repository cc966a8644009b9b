"""Build of fastclip's native modules.

Metadata lives in pyproject.toml. Each native module is a CMake target built by ``CMakeBuild``;
the Cython module is compiled by CMake too (``python -m cython``), so one build tree holds both.
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    """A module built by the CMake target of the same last name (``fastclip._C`` -> ``_C``)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        # get_ext_fullpath points into the source tree for editable/inplace builds and into the
        # build dir otherwise, so CMake writes the module exactly where setuptools expects it.
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # One CMake tree per interpreter: a cache configured from another environment (e.g. pip's
        # deleted isolated build env, whose ninja it remembers) must never be reused.
        env_key = hashlib.sha1(sys.executable.encode()).hexdigest()[:10]
        build_temp = Path(self.build_temp).resolve() / f"{ext.name}-{env_key}"
        build_temp.mkdir(parents=True, exist_ok=True)
        target = ext.name.rsplit(".", 1)[-1]
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        ninja = shutil.which("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--target", target, "-j", jobs], cwd=build_temp,
                       check=True)


setup(
    # _C: the pybind11 core; _nanobatch: NanoBatch mode's Cython clip-and-accumulate loop.
    ext_modules=[CMakeExtension("fastclip._C"), CMakeExtension("fastclip._nanobatch")],
    cmdclass={"build_ext": CMakeBuild},
)
