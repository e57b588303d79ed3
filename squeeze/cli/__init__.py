"""The `squeeze` command line (entry point: squeeze.cli:main), part of the top layer (squeeze/)."""

from squeeze.cli.main import main
from squeeze.cli.parser import build_parser

__all__ = ["main", "build_parser"]
