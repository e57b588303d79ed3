"""Running the stages: one chain at a time, each stage's output written atomically with its
stage.json and manifest, completed stages kept and skipped on a re-run. Each stage is computed
under its directory's lock (squeeze.pipeline.rundir.stage_lock) and recorded in events.jsonl."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from compress import coverage, gpulock, moe, registry
from compress.export.compressed_tensors import is_quantized, save_compressed
from compress.fsutil import atomic_dir, atomic_write_text
from compress.manifest import write_manifest
from compress.models import load_model
from squeeze.pipeline.checks import stage_context
from squeeze.pipeline.rundir import chain_dirs, is_complete, link_store, record, stage_lock
from squeeze.recipe import Recipe
from compress.spec import StageSpec, chain_key


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save_model(model, tok, out: Path) -> None:
    """An HF directory: dense safetensors, or compressed-tensors when a stage quantized."""
    if is_quantized(model):
        save_compressed(model, out)
    else:
        model.save_pretrained(out)
    tok.save_pretrained(out)


def run_chain(recipe: Recipe, stages: list[StageSpec], outs: list[Path], device: str, base_dir: Path,
              label: str = "", events: Path | None = None) -> None:
    """Run (or resume) one chain of stages into `outs`; stages already complete are kept. The
    model is held in host memory; stages move what they work on to `device`."""
    prev = base_dir
    held = [None, None]  # the model and tokenizer in memory between stages
    for i, (spec, out) in enumerate(zip(stages, outs)):
        tag = f"{label}[{i + 1}/{len(outs)}] {spec.type}"
        with stage_lock(out):  # a second writer waits here, then finds the stage complete
            if is_complete(out):
                log(f"{tag}: done earlier, kept ({out})")
                held[0] = None
            else:
                _run_stage(recipe, stages, i, prev, out, device, base_dir, tag, held)
                record(events, "stage computed", stage=out.name, type=spec.type)
        prev = out


def _run_stage(recipe: Recipe, stages: list[StageSpec], i: int, prev: Path, out: Path, device: str, base_dir: Path,
               tag: str, held: list) -> None:
    """Stage `i` of the chain on the model in `held` (loaded from `prev` if none), saved to `out`."""
    m, spec = recipe.model, stages[i]
    model, tok = held
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
    with gpulock.shared(device):  # vLLM engines starting on this GPU elsewhere wait (compress.gpulock)
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
    held[:] = [None if is_quantized(model) else model, tok]  # a packed model is reloaded by the next stage


def chains(recipe: Recipe) -> list[tuple[str, list[StageSpec]]]:
    """(variant name, its stages) for a matrix; ('', the stages) for one recipe."""
    if not recipe.is_matrix:
        return [("", list(recipe.stages))]
    return [(v.name, recipe.stages + v.stages) for v in recipe.variants]


def run_stages(recipe: Recipe, run_dir: Path, device: str, base_dir: Path, store: Path | None = None,
               run: bool = True) -> list[tuple[str, list[StageSpec], list[Path]]]:
    """Run (or resume) every chain of the recipe: [(variant name or '', its stages, their dirs)].
    With a `store`, the run directory's stage names link to its content-addressed directories
    (rundir.link_store). With `run` False nothing is computed: the chains are only laid out."""
    done = []
    for k, (name, stages) in enumerate(chains(recipe)):
        outs = chain_dirs(recipe, run_dir, stages)
        write = link_store(run_dir, store, recipe, outs, stages) if store is not None else outs
        if run:
            run_chain(recipe, stages, write, device, base_dir, events=run_dir / "events.jsonl",
                      label=f"{name} ({k + 1}/{len(recipe.variants)}) " if name else "")
        done.append((name, stages, outs))
    if recipe.is_matrix:
        atomic_write_text(run_dir / "variants.json", json.dumps(
            {name: [str(d) for d in outs] for name, _, outs in done}, indent=1))
    return done
