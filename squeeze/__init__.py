"""The top layer of Squeeze: the `squeeze` command line (squeeze.cli), a recipe's run
(squeeze.pipeline) and the recipe as a whole (squeeze.recipe). It is the only code that
imports both halves: compress/ (compression) and eval/ (evaluation), neither of which
imports it or each other's way up (tests/test_layout.py)."""
