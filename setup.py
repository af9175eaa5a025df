"""setuptools entry point (metadata lives in pyproject.toml).

The C++ CPU extension is compiled on first use by torch.utils.cpp_extension.load (ninja, cached
under ~/.cache/torch_extensions): installing needs no compiler, and pip never pulls a second
(CUDA) torch into an isolated build environment just to build it. A wheel carries the sources
as fastpatch/_csrc so a non-editable install can build them too.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "csrc"
        if src.is_dir():
            shutil.copytree(src, Path(self.build_lib) / "fastpatch" / "_csrc", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})
