"""The `squeeze` command line (entry point: compress.cli:main). With the pipeline and the recipe
schema it forms the top layer, the only code that imports both compress/ and eval/."""

from compress.cli.main import main
from compress.cli.parser import build_parser

__all__ = ["main", "build_parser"]
