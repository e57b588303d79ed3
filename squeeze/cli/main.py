"""`squeeze` command line: run | eval | compare | gate | serving | tune | validate | import-gguf | stages.

Bad input (a recipe, a path, a flag) is reported as one line per problem and exit code 2,
never a traceback.
"""

from __future__ import annotations

import sys

from squeeze.cli.engines import cmd_serving, cmd_tune
from squeeze.cli.evaluate import cmd_eval
from squeeze.cli.parser import build_parser
from squeeze.cli.recipes import cmd_import, cmd_run, cmd_stages, cmd_validate
from squeeze.cli.reports import cmd_compare, cmd_gate
from compress.errors import UserError

COMMANDS = {"run": cmd_run, "eval": cmd_eval, "compare": cmd_compare, "gate": cmd_gate, "serving": cmd_serving,
            "tune": cmd_tune, "validate": cmd_validate, "import-gguf": cmd_import, "stages": cmd_stages}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if getattr(a, "data_dir", None):
            from compress.data import set_data_dir

            set_data_dir(a.data_dir)
        return COMMANDS[a.cmd](a)
    except UserError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed work is kept (stages, tuning trials) and a re-run resumes after it",
              file=sys.stderr)
        return 130
