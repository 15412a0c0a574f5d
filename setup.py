"""Build steps pyproject.toml cannot declare: the optional C hook, and the start-up .pth file.

Everything else about the package (metadata, dependencies, entry points) is in pyproject.toml.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PTH = "asyncdiag_autostart.pth"


class BuildPyWithPth(build_py):
    """Puts ``asyncdiag_autostart.pth`` at the top of the wheel, next to the package.

    Installed into site-packages, it makes ``ASYNCDIAG_ENABLED=1`` work with no code change.
    """

    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join("src", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(
    ext_modules=[
        # Optional: without a C compiler the build warns and the package falls back to the
        # Python version of the same hook (asyncdiag._asyncgens), slower per generator.
        Extension("asyncdiag._speedups", ["src/asyncdiag/_speedups.c"], optional=True),
    ],
    cmdclass={"build_py": BuildPyWithPth},
)
