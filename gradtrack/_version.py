"""The version, written only here: ``pyproject.toml`` reads it when the package is built."""

__version__ = "0.1.0"
