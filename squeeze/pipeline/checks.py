"""Before any work: the recipe's evaluation, serving, tuning and gate settings, then every
stage's own checks on a weightless (meta) copy of the input model; and the StageContext each
stage sees, built from the recipe."""

from __future__ import annotations

import copy
from pathlib import Path

from compress import coverage, moe, registry
from compress.errors import UserError
from compress.models import load_tokenizer, meta_model
from squeeze.pipeline.rundir import artifact_names
from squeeze.recipe import Recipe
from compress.stage import StageContext
from eval.engines import engine_class, engine_facts, open_engine


def stage_context(recipe: Recipe, device: str, tokenizer, model_dir: Path, base_dir: Path | None = None,
                  work_dir: Path | None = None) -> StageContext:
    return StageContext(device=device, seed=recipe.seed, tokenizer=tokenizer, model_dir=model_dir,
                        engine_facts=engine_facts(recipe.eval, recipe.model, device),
                        base_dir=base_dir, work_dir=work_dir, open_engine=open_engine)


def preflight(recipe: Recipe, device: str, base_dir: Path) -> None:
    """Run every stage's own checks on a weightless copy of the input model, before any work."""
    hf = recipe.eval.hf
    for name in recipe.eval.engine_list():
        engine_class(name).check_config(recipe.eval, device)
        engine_class(name).check_model(recipe.eval, recipe.model, base_dir)
    if hf.compile_decode and hf.decode == "dynamic":
        raise UserError("eval.hf.compile_decode: needs eval.hf.decode static or cuda_graph")
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
