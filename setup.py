"""The compiled part of the package: the fast path's scanners (proxy/protocol/scan.pyx), built by
``pip install .`` (and ``pip install -e .``, in place). The rest of the build is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import setup

setup(ext_modules=cythonize(["proxy/protocol/scan.pyx"], compiler_directives={"language_level": "3"}))
