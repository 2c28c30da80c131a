"""The version of stn_kernels (also in pyproject.toml), apart so that :mod:`stn_kernels.config` reads it without
importing the package."""

__version__ = "0.1.0"
