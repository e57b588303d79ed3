"""Run a recipe: stages in order, each saved as an HF directory, then evaluate and report.

Run directory layout (default ``checkpoints/<recipe name>/``)::

    run.json                      identity: the recipe's compression hash (model, seed, stages)
    recipe.yaml, recipe.json      the recipe as given and as validated
    stages/01-<type>/             HF model dir + stage.json + manifest.json (complete, or absent)
    stages/<key>-<type>/          the same for a matrix recipe, content-addressed (compress.matrix)
    report.json, .md, .html       the evaluation report (eval.report); each evaluated stage directory
                                  gets its model card, README.md (eval.report.card)
    gate.json, gate.xml           the release gate's verdicts, where the recipe has a gate

Every stage directory is written under a temporary name and renamed when complete, its
manifest last, so a crash never leaves a stage that looks done. Running the same recipe
again resumes after the last completed stage; a directory made by another recipe is never
overwritten without ``force``. A matrix run directory is only tied to its model and seed: its
stage directories are keyed by content, so adding variants to the matrix reuses every stage
already made.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from compress import coverage, moe, registry
from compress.errors import UserError
from compress.export.compressed_tensors import is_quantized, save_compressed
from compress.fsutil import atomic_dir, atomic_write_text
from compress.manifest import write_manifest
from compress.models import home, load_model, load_tokenizer, meta_model, resolve_device, resolve_model
from compress.recipe import Recipe
from compress.spec import StageSpec, chain_key
from compress.stage import StageContext


def run_dir_for(recipe: Recipe, output: str | Path | None = None) -> Path:
    """The run directory: `output` if given, else <SQUEEZE_HOME>/<recipe name>."""
    return Path(output) if output else home() / recipe.name


def stage_dir(run_dir: Path, i: int, type_: str) -> Path:
    return run_dir / "stages" / f"{i + 1:02d}-{type_}"


def is_complete(d: Path) -> bool:
    return (d / "manifest.json").is_file()


def identity_hash(recipe: Recipe) -> str:
    """What a run directory is tied to: the compression hash, or for a matrix (whose stage
    directories are keyed by content) the model and seed only."""
    return chain_key(recipe.model, recipe.seed, []) if recipe.is_matrix else recipe.compression_hash()


def prepare_run_dir(recipe: Recipe, run_dir: Path, force: bool, recipe_text: str | None) -> None:
    """Claim `run_dir` for this recipe: new, same recipe (resume), or refuse/overwrite on `force`."""
    ident = run_dir / "run.json"
    h = identity_hash(recipe)
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            shutil.rmtree(run_dir)
        elif not ident.is_file():
            raise UserError(f"{run_dir}: exists and is not a squeeze run directory; choose another --output "
                            "or pass --force to replace it")
        else:
            old = json.loads(ident.read_text())
            if old.get("compression_hash") != h:
                raise UserError(
                    f"{run_dir}: was made by a different recipe (model, seed or stages differ: "
                    f"{old.get('compression_hash', '?')[:12]} vs {h[:12]}); pass --force to replace it "
                    "or --output to run elsewhere")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not ident.is_file():
        atomic_write_text(ident, json.dumps({"compression_hash": h, "created": time.strftime("%FT%T%z"),
                                             "recipe_name": recipe.name}, indent=1))
    if recipe_text is not None:
        atomic_write_text(run_dir / "recipe.yaml", recipe_text)
    atomic_write_text(run_dir / "recipe.json", json.dumps(recipe.as_dict(), indent=1))


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on `run_dir` (a sibling lock file) for the whole run."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another squeeze run is using this directory") from None
        yield


def clear_partial(run_dir: Path) -> None:
    """Remove temporaries a killed run left behind (they never look like completed stages)."""
    for p in (run_dir / "stages").glob(".*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stage_context(recipe: Recipe, device: str, tokenizer, model_dir: Path, base_dir: Path | None = None,
                  work_dir: Path | None = None) -> StageContext:
    e = recipe.eval
    return StageContext(device=device, seed=recipe.seed, tokenizer=tokenizer, model_dir=model_dir,
                        engines=tuple(e.engine_list()), engine_dtypes={"hf": recipe.model.dtype,
                                                                 "vllm": e.vllm.dtype or recipe.model.dtype},
                        base_dir=base_dir, work_dir=work_dir)


def preflight(recipe: Recipe, device: str, base_dir: Path) -> None:
    """Run every stage's own checks on a weightless copy of the input model, before any work."""
    hf = recipe.eval.hf
    if hf.decode == "cuda_graph" and "hf" in recipe.eval.engine_list() and not device.startswith("cuda"):
        raise UserError(f"eval.hf.decode: cuda_graph needs a CUDA GPU; the device is {device} (use static or dynamic)")
    if hf.compile_decode and hf.decode == "dynamic":
        raise UserError("eval.hf.compile_decode: needs eval.hf.decode static or cuda_graph")
    if recipe.eval.hf.sparse_kernels and "hf" in recipe.eval.engine_list() and not device.startswith("cuda"):
        raise UserError(f"eval.hf.sparse_kernels: torch's semi-structured (2:4) kernels need a CUDA GPU; the "
                        f"device is {device}")
    from eval import serve_tune
    from eval.evaluate import check_eval

    check_eval(recipe.eval)
    serve_tune.check(recipe.eval, device)
    if recipe.gate:
        from eval.report.gate import recipe_gate_errors

        if errs := recipe_gate_errors(recipe, artifact_names(recipe)):
            raise UserError(*errs)
    specs = [(f"stages[{i}]", s) for i, s in enumerate(recipe.stages)]
    specs += [(f"matrix variant {v.name!r} stages[{i}]", s) for v in recipe.variants for i, s in enumerate(v.stages)]
    seen, checks = set(), []
    for at, s in specs:
        check = registry.get(s.type).check
        if check is not None and repr((s.type, s.config)) not in seen:
            seen.add(repr((s.type, s.config)))
            checks.append((at, s, check))
    if not checks:
        return
    m = recipe.model
    meta = meta_model(base_dir, m.dtype, m.trust_remote_code)
    linear = None  # the same with its fused experts as per-expert linears, made when a stage needs it
    ctx = stage_context(recipe, device, load_tokenizer(base_dir, m.trust_remote_code), base_dir, base_dir)
    errors = []
    for at, spec, check in checks:
        stage = registry.get(spec.type)
        if stage.experts and linear is None and moe.fused_experts(meta):
            linear = copy.deepcopy(meta)
            moe.linearize(linear)
        model = linear if stage.experts and linear is not None else meta
        why = coverage.refusal(model, spec.type) if stage.weights else None
        calib = getattr(spec.config, "calibration", None)
        if getattr(calib, "calibrate_all_experts", False) and not moe.expert_blocks(meta):
            why = (f"calibration.calibrate_all_experts: {type(meta).__name__} has no mixture-of-experts layers, so it "
                   "does nothing there; remove it")
        if why:
            errors.append(f"{at} ({spec.type}): {why}")
            continue
        try:
            check(spec.config, model, ctx)
        except UserError as e:
            errors += [f"{at} ({spec.type}): {line}" for line in e.lines]
    if errors:
        raise UserError(*errors)


def save_model(model, tok, out: Path) -> None:
    """An HF directory: dense safetensors, or compressed-tensors when a stage quantized."""
    if is_quantized(model):
        save_compressed(model, out)
    else:
        model.save_pretrained(out)
    tok.save_pretrained(out)


def chain_dirs(recipe: Recipe, run_dir: Path, stages: list[StageSpec]) -> list[Path]:
    """Output directory of each stage of a chain: numbered for one recipe, keyed by content for a
    matrix (so variants that share a prefix of stages share its directories)."""
    if not recipe.is_matrix:
        return [stage_dir(run_dir, i, s.type) for i, s in enumerate(stages)]
    return [run_dir / "stages" / f"{chain_key(recipe.model, recipe.seed, stages[:i + 1])[:12]}-{s.type}"
            for i, s in enumerate(stages)]


def run_chain(recipe: Recipe, stages: list[StageSpec], outs: list[Path], device: str, base_dir: Path,
              label: str = "") -> None:
    """Run (or resume) one chain of stages into `outs`; stages already complete are kept. The
    model is held in host memory; stages move what they work on to `device`."""
    m = recipe.model
    model = tok = None
    prev = base_dir
    for i, (spec, out) in enumerate(zip(stages, outs)):
        tag = f"{label}[{i + 1}/{len(outs)}] {spec.type}"
        if is_complete(out):
            log(f"{tag}: done earlier, kept ({out})")
            prev, model = out, None
            continue
        if model is None:
            model, tok = load_model(prev, m.dtype, "cpu", m.trust_remote_code, m.allow_pickle)
        stage = registry.get(spec.type)
        ctx = stage_context(recipe, device, tok, prev, base_dir, out.parent.parent / "work" / out.name)
        torch.manual_seed(recipe.seed)
        t0 = time.perf_counter()
        log(f"{tag}: running")
        if stage.experts:
            moe.linearize(model)  # fused experts as per-expert nn.Linear for the stage (compress.moe)
        before = coverage.fingerprint(model) if stage.weights else None
        model, info = stage.apply(model, spec.config, ctx)
        if before is not None:
            info["coverage"] = coverage.coverage(before, model)
        if not is_quantized(model):
            moe.fuse(model)  # a quantized model is written per expert, the layout vLLM and transformers read
        secs = time.perf_counter() - t0
        with atomic_dir(out) as tmp:
            save_model(model, tok, tmp)
            atomic_write_text(tmp / "stage.json", json.dumps(
                {"type": spec.type, "config": spec.config.model_dump(), "info": info, "seconds": secs}, indent=1))
            write_manifest(tmp, {"seed": recipe.seed, "recipe_hash": recipe.compression_hash(),
                                 "chain_key": chain_key(m, recipe.seed, stages[:i + 1]),
                                 "stage_index": i, "input": str(prev), "device": device})
        shutil.rmtree(ctx.work_dir, ignore_errors=True)  # its checkpoints are no longer needed
        log(f"{tag}: done in {secs:.1f} s -> {out}")
        prev = out
        if is_quantized(model):  # packed in place by the export: later stages reload it
            model = None


def chains(recipe: Recipe) -> list[tuple[str, list[StageSpec]]]:
    """(variant name, its stages) for a matrix; ('', the stages) for one recipe."""
    if not recipe.is_matrix:
        return [("", list(recipe.stages))]
    return [(v.name, recipe.stages + v.stages) for v in recipe.variants]


def run_stages(recipe: Recipe, run_dir: Path, device: str, base_dir: Path) -> list[tuple[str, list[StageSpec],
                                                                                        list[Path]]]:
    """Run (or resume) every chain of the recipe: [(variant name or '', its stages, their dirs)]."""
    done = []
    for k, (name, stages) in enumerate(chains(recipe)):
        outs = chain_dirs(recipe, run_dir, stages)
        run_chain(recipe, stages, outs, device, base_dir, label=f"{name} ({k + 1}/{len(recipe.variants)}) " if name
                  else "")
        done.append((name, stages, outs))
    if recipe.is_matrix:
        atomic_write_text(run_dir / "variants.json", json.dumps(
            {name: [str(d) for d in outs] for name, _, outs in done}, indent=1))
    return done


def run(recipe: Recipe, run_dir: Path | None = None, force: bool = False, recipe_text: str | None = None,
        evaluate_outputs: bool = True) -> dict | None:
    """Run a recipe end to end; return the report (None when `evaluate_outputs` is False)."""
    run_dir = run_dir_for(recipe, run_dir)
    device = resolve_device(recipe.device)
    base_dir = resolve_model(recipe.model.source, recipe.model.allow_pickle)
    preflight(recipe, device, base_dir)
    with run_lock(run_dir):
        prepare_run_dir(recipe, run_dir, force, recipe_text)
        clear_partial(run_dir)
        done = run_stages(recipe, run_dir, device, base_dir)
        if evaluate_outputs:
            return _evaluate_and_report(recipe, run_dir, device, base_dir, done)
    return None


def _targets(recipe: Recipe, done: list[tuple[str, list[StageSpec], list[Path]]]) -> list[dict]:
    """What to evaluate: each variant's final output for a matrix; every stage output of one
    recipe (or its last with eval.artifacts: final). Artifact entries without metrics yet."""
    out = []
    for name, stages, outs in filter(lambda c: c[2], done):
        keep = range(len(outs)) if not recipe.is_matrix and recipe.eval.artifacts == "all" else [len(outs) - 1]
        out += [{"name": name or outs[i].name, "stages": [s.type for s in stages[:i + 1]], "model_dir": outs[i],
                 "final": i == len(outs) - 1} for i in keep]
    return out


def _evaluate_and_report(recipe: Recipe, run_dir: Path, device: str, base_dir: Path,
                         done: list[tuple[str, list[StageSpec], list[Path]]]) -> dict:
    from eval.evaluate import evaluate, protocol
    from eval.paired import pair_entries
    from eval.report.card import write_cards
    from eval.report.report import build_report, write_report

    m, ecfg = recipe.model, recipe.eval
    targets = _targets(recipe, done)
    entries = [{"name": "baseline", "model_dir": base_dir}] + targets
    for i, entry in enumerate(entries):
        entry["engines"] = {}
        for engine in ecfg.engine_list():
            tag = f"[eval {i + 1}/{len(entries)}] {entry['name']} ({engine})"
            log(tag)
            t0 = time.perf_counter()
            res = evaluate(entry["model_dir"], ecfg, m, engine=engine, device=device, seed=recipe.seed)
            entry["engines"][engine] = res
            log(f"{tag}: " + ("cached" if res.get("cached") else f"measured in {time.perf_counter() - t0:.0f} s"))
    pair_entries(entries[0], targets, ecfg, m, device, recipe.seed, log)  # speedups: paired rounds (eval.paired)
    for a in targets:
        st = json.loads((a["model_dir"] / "stage.json").read_text())
        a.update(stage=st["type"], stage_info=st["info"], model_dir=str(a["model_dir"]))
    report = build_report({"name": f"baseline ({m.source})", "model_dir": str(base_dir),
                           "engines": entries[0]["engines"]}, targets, recipe=recipe.as_dict(), device=device,
                          protocol=protocol(ecfg, m, device, recipe.seed),
                          provenance={"recipe_hash": recipe.recipe_hash(),
                                      "compression_hash": recipe.compression_hash(),
                                      "seeds": {"recipe": recipe.seed, "eval": recipe.seed}})
    finals = [(a["name"], Path(a["model_dir"])) for a in targets if a["final"]]
    if ecfg.serving is not None:
        from eval import serve_tune

        report["serving"] = serve_tune.serving(recipe.eval, recipe.model, recipe.seed, run_dir, device, [("baseline", base_dir), *finals], log)
    if ecfg.tune is not None:
        from eval import serve_tune

        report["tuning"] = serve_tune.tuning(recipe.eval, recipe.model, run_dir, device, finals, log)
    if recipe.gate:
        from eval.report.gate import apply_gate, junit_xml

        report["gate"] = apply_gate(report, recipe.gate, "recipe")
        atomic_write_text(run_dir / "gate.json", json.dumps(report["gate"], indent=1, default=str))
        atomic_write_text(run_dir / "gate.xml", junit_xml(report["gate"], f"squeeze gate: {recipe.name}"))
    write_report(report, run_dir)
    write_cards(report)  # README.md (model card) in each artifact directory
    return report


def artifact_names(recipe: Recipe) -> list[str]:
    """Names the report will give the artifacts (what a gate's `artifacts` glob matches)."""
    if recipe.is_matrix:
        return [v.name for v in recipe.variants]
    return [d.name for d in chain_dirs(recipe, Path(), recipe.stages)]


def evaluation_errors(report: dict) -> list[str]:
    """One line per failed evaluation in a report ('<model> (<engine>): <error>')."""
    return [f"{entry['name']} ({e}): {m['error']}" for entry in [report["baseline"], *report["artifacts"]]
            for e, m in entry["engines"].items() if m.get("error")]
