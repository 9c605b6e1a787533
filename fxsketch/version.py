"""The package's version, recorded in saved artifacts and plan files."""

__version__ = "0.1.0"
