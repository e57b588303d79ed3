"""Wanda at 50 % on the real SmolLM2 with the shipped recipe: the perplexity stays within the
issue's bound (2.5 x dense; magnitude pruning reaches 18 x). Slow: about 2 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_wanda_50_keeps_smollm2_within_2_5x_of_dense(smol_home, tmp_path):
    """recipes/wanda-50.yaml as shipped, its perplexity over 4 windows instead of 8 (the suite's
    time; the CPU demo measures the same ratio, 2.26x, over those 4)."""
    import yaml

    raw = yaml.safe_load((REPO / "recipes" / "wanda-50.yaml").read_text())
    raw["eval"]["perplexity"]["max_tokens"] = 4096
    recipe = tmp_path / "wanda-50.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "SQUEEZE_HOME": str(smol_home)}
    r = subprocess.run([sys.executable, "-m", "squeeze.cli", "run", str(recipe)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((smol_home / "wanda-50" / "report.json").read_text())
    base = rep["baseline"]["engines"]["hf"]["perplexity"]["perplexity"]
    art = rep["artifacts"][0]
    ppl = art["engines"]["hf"]["perplexity"]["perplexity"]
    assert base < ppl <= 2.5 * base, (base, ppl)
    layers = art["stage_info"]["layer_sparsity"]
    assert len(layers) == 210 and all(abs(s - 0.5) < 1e-3 for s in layers.values())
    md = (smol_home / "wanda-50" / "report.md").read_text()
    assert "sparsity per layer min 0.500" in md and "M non-zero" in md
