"""qsvd's version, as its package metadata (pyproject.toml) gives it."""

from importlib.metadata import version

__version__ = version("qsvd")
