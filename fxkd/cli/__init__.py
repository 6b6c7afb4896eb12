"""The ``fxkd`` command (compress, validate, demo), its data sets and the shipped teachers."""

from fxkd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
