"""A recipe's `eval.serving` and `eval.tune`: serving load and engine tuning per model.

Serving runs the workload against a vLLM server for the baseline and every final artifact
(one server at a time, each stopped before the next starts); a model's result is kept in
<run>/serving/<model>.json under a key of its content hash, the workload and the server
settings, so a re-run measures only what changed. Tuning runs one study per final artifact
in <run>/tune/<artifact>/ (resumable, eval.tune.study). Both add a section to the report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compress.fsutil import atomic_write_text
from compress.models import model_hash
from compress.spec import ModelSpec
from eval.config import EvalConfig


def check(cfg: EvalConfig, device: str) -> None:
    """Before any work: vLLM installed where serving or vLLM tuning needs it, a valid space."""
    from eval.engines import check_engines
    from eval.tune.study import check_tune

    if cfg.serving is not None:
        check_engines(["vllm"])
    if cfg.tune is not None:
        check_tune(cfg.tune, device)


def _server_settings(cfg: EvalConfig, model: ModelSpec, device: str) -> dict:
    from eval.speed.serving import context_len
    from eval.tune.trials import vllm_base

    w = cfg.serving
    base = {k: v for k, v in vllm_base(cfg.vllm, model, device).items() if v is not None}
    base.setdefault("max_model_len", context_len(w))
    return base


def serving(cfg: EvalConfig, model: ModelSpec, seed: int, run_dir: Path, device: str,
            models: list[tuple[str, Path]], log) -> dict:
    """The serving section: every model's load points (cached per model) and the SLO lines."""
    from compress.models import load_tokenizer
    from eval.engines.server import VLLMServer
    from eval.evaluate import stack_versions
    from eval.speed.serving_report import run_targets, serving_markdown

    w, settings = cfg.serving, _server_settings(cfg, model, device)
    rows, summaries, errors = [], {}, []
    tok = load_tokenizer(models[0][1], model.trust_remote_code)
    for name, d in models:
        key = hashlib.sha256(json.dumps([model_hash(d), w.model_dump(mode="json"), settings, seed,
                                         stack_versions(device)], default=str).encode()).hexdigest()[:16]
        cache = run_dir / "serving" / f"{name}.json"
        hit = json.loads(cache.read_text()) if cache.is_file() else None
        if hit is None or hit.get("key") != key:
            log(f"[serving] {name}: starting a vLLM server")
            res = run_targets([("server", name, lambda d=d: VLLMServer(d, settings, device=device,
                                                                      log_path=run_dir / "serving" / f"{name}.log"))],
                              w, tok, seed=seed, log=log)
            hit = {"key": key, **res}
            if not res["errors"]:  # a server that did not start is tried again next run
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache, json.dumps(hit, indent=1, default=str))
        else:
            log(f"[serving] {name}: cached")
        rows += hit["rows"]
        summaries.update(hit["summaries"])
        errors += hit.get("errors", [])
    res = {"workload": w.model_dump(mode="json"), "slo": hit["slo"], "settings": settings, "rows": rows,
           "summaries": summaries, "errors": errors}
    atomic_write_text(run_dir / "serving.md", serving_markdown(res))
    return res


def tuning(cfg: EvalConfig, model: ModelSpec, run_dir: Path, device: str, artifacts: list[tuple[str, Path]],
           log) -> dict:
    """The tuning section: one study per final artifact; its best setting and gain."""
    from eval.tune.study import Study

    out = {}
    for name, d in artifacts:
        log(f"[tune] {name}: {cfg.tune.strategy} search, budget {cfg.tune.budget}")
        st = Study(d, cfg.tune, model, cfg.vllm, device, out_dir=run_dir / "tune" / name, log=log)
        res = st.run()
        out[name] = {k: res[k] for k in ("engine", "hardware", "strategy", "objective", "unit", "measured", "failed",
                                         "best", "gain", "apply")}
        out[name]["landscape"] = str(st.dir / "landscape.md")
    return out


def report_lines(report: dict) -> list[str]:
    """Markdown for report.md: the serving table and one tuning summary per artifact."""
    from eval.speed.serving_report import serving_markdown
    from eval.tune.landscape import recommendation

    lines = []
    if report.get("serving"):
        lines += ["", "Serving (vLLM server, streaming load):", "", serving_markdown(report["serving"]).rstrip()]
    for name, t in (report.get("tuning") or {}).items():
        lines += ["", f"Engine tuning, {name} ({t['engine']} on {t['hardware']}, {t['strategy']}, "
                      f"objective {t['objective']}): {t['landscape']}",
                  *recommendation(t)]
    return lines
