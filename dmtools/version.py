"""The release: one home, read by ``pyproject.toml`` (setuptools ``attr``) and by the code."""

__version__ = "0.1.0"
