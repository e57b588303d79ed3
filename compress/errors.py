"""User-facing errors: the CLI prints them as one line each (no traceback) and exits 2."""


class UserError(Exception):
    """Bad input from the user: a recipe, a path, a flag. `lines` are printed one per line."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = list(lines)
