"""A recipe's run fanned out over a Ray cluster (`squeeze run --cluster`, the recipe's `execution:`).

The work becomes tasks (squeeze.pipeline.scheduler), each started as soon as its input exists:

- one per *segment* of stages: the recipe's chains form a tree (variants share prefixes, and a
  prefix's directory is keyed by content), cut where it branches and where an artifact is
  evaluated; a segment runs through `run_chain` with its model in memory, as the sequential run
  does, so no stage directory is written twice and a completed segment is no task at all;
- one per (model, engine) evaluation (eval.evaluate), the baseline's at once, an artifact's when
  its segment is done;
- one per (artifact, engine) paired speed measurement (eval.paired), when both evaluations are.

Then the driver runs the ordinary `evaluate_and_report` with what the tasks measured: the
report, the gate and the model cards are the sequential run's code. Every task records what it
computed in the run's events.jsonl (squeeze.pipeline.rundir.record); a rerun finds every
completed stage on disk and every measurement in the evaluation cache, so nothing is redone.

Where things are: the run directory (and `store`, when given) must be one path that every node
mounts; the evaluation cache goes to `<store>/_eval_cache` or SQUEEZE_HOME's. Both are probed
from every node before any work (squeeze.pipeline.cluster).
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import UserError
import squeeze.pipeline.cluster as cluster
from squeeze.pipeline.chain import log, run_chain, run_stages
from squeeze.pipeline.evaluation import _targets
from squeeze.pipeline.rundir import is_complete, record
from squeeze.pipeline.scheduler import Task, run_tasks
from squeeze.recipe import Execution, Recipe


# Of a shared GPU, what an evaluation task holds beyond vLLM's gpu_memory_utilization: on an H100
# 80GB (vLLM 0.26) each engine's process took 1.5 GiB over utilization x memory (its CUDA context,
# kernel warm-up) and each task's own process 0.65 GiB; a paired task opens two engines, 3.65 GiB
# in all, 4.6 % of that GPU. Four tasks at 0.25 with 0.225 each filled all 79.2 GiB, and the fourth
# engine ran out of memory while it started (benchmarks/results/cluster_gpu.jsonl).
SHARE_HEADROOM = 0.05


def most_utilization(eval_gpus: float) -> float | None:
    """The largest eval.vllm.gpu_memory_utilization an evaluation taking `eval_gpus` of a shared GPU
    may set (None for whole GPUs: vLLM's own setting applies)."""
    return round(eval_gpus - SHARE_HEADROOM, 3) if 0 < eval_gpus < 1 else None


def check(recipe: Recipe, ex: Execution) -> None:
    """What is wrong with `execution` before connecting to anything."""
    cluster.import_ray()
    util = recipe.eval.vllm.gpu_memory_utilization
    most = most_utilization(ex.eval_gpus)
    if "vllm" in recipe.eval.engine_list() and most is not None:
        if most <= 0:
            raise UserError(f"execution.eval_gpus: {ex.eval_gpus:g} of a GPU per evaluation leaves vLLM no memory "
                            f"(each task holds about {SHARE_HEADROOM:g} of a GPU beyond vLLM's share); give each "
                            f"evaluation more than {SHARE_HEADROOM:g}")
        if util > most:
            raise UserError(f"execution.eval_gpus: {ex.eval_gpus:g} of a GPU per evaluation, but "
                            f"eval.vllm.gpu_memory_utilization is {util:g}; set it at most {most:g} so that the "
                            f"engines sharing a GPU fit (each task holds about {SHARE_HEADROOM:g} of a GPU beyond it)")


# ---- what runs in a worker (module-level: Ray ships them by reference) ----------------------------

def _device(gpus: bool) -> str:
    return "cuda" if gpus else "cpu"  # Ray's CUDA_VISIBLE_DEVICES: the task's own GPUs start at 0


def stage_task(recipe: Recipe, stages, outs, gpus: bool, base_dir: Path, label: str, events: Path) -> str:
    run_chain(recipe, stages, outs, _device(gpus), base_dir, label=f"{label} ", events=events)
    return str(outs[-1])


def eval_task(recipe: Recipe, model_dir: Path, engine: str, gpus: bool, events: Path, name: str) -> dict:
    from eval.evaluate import evaluate

    res = evaluate(model_dir, recipe.eval, recipe.model, engine=engine, device=_device(gpus), seed=recipe.seed)
    if not res.get("cached") and not res.get("error"):
        record(events, "evaluation measured", model=name, engine=engine)
    return res


def paired_task(recipe: Recipe, base_dir: Path, art_dir: Path, engine: str, gpus: bool, events: Path,
                name: str) -> dict:
    from eval.paired import paired_speeds

    res = paired_speeds(base_dir, [art_dir], recipe.eval, recipe.model, engine, _device(gpus), recipe.seed, log=log)[0]
    if not res.get("cached") and not res.get("error"):
        record(events, "paired speed measured", model=name, engine=engine)
    return res


# ---- the plan --------------------------------------------------------------------------------------

def _segments(done, ends: set[str]) -> list[tuple[str, list, list[Path]]]:
    """(label, stages, dirs) of each segment of the chains' tree, ending at a branch, a chain's
    end or a directory in `ends`; parents before children."""
    nodes, order = {}, []
    for name, stages, outs in done:
        for i, o in enumerate(outs):
            k = str(o)
            if k not in nodes:
                nodes[k] = {"i": i, "stages": stages, "outs": outs, "name": name, "kids": set(), "final": False}
                order.append(k)
            if i:
                nodes[str(outs[i - 1])]["kids"].add(k)
        if outs:
            nodes[str(outs[-1])]["final"] = nodes[str(outs[-1])]["final"] or name or True
    out = []
    for k in order:
        n = nodes[k]
        if len(n["kids"]) != 1 or n["final"] or k in ends:
            label = n["final"] if isinstance(n["final"], str) else Path(k).name
            out.append((label, n["stages"][:n["i"] + 1], n["outs"][:n["i"] + 1]))
    return out


def plan(recipe: Recipe, done, base_dir: Path, gpus: bool, ex: Execution, events: Path) -> list[Task]:
    """Every task of the run, with its dependencies (module docstring)."""
    targets = _targets(recipe, done)
    stage_res = {"CPU": ex.stage_cpus, "GPU": ex.stage_gpus if gpus else 0}
    eval_res = {"CPU": ex.eval_cpus, "GPU": ex.eval_gpus if gpus else 0}
    base = Path(base_dir).resolve()
    tasks, made_by = [], {}  # made_by: a segment's last directory -> its task id
    for label, stages, outs in _segments(done, {str(t["model_dir"]) for t in targets}):
        prior = [made_by[str(o)] for o in outs[:-1] if str(o) in made_by]
        made_by[str(outs[-1])] = tid = f"stages {label}"
        if not all(is_complete(o) for o in outs):  # a segment made earlier is no task: what waits for it starts
            tasks.append(Task(tid, stage_task, (recipe, stages, [Path(o).resolve() for o in outs], gpus, base, tid,
                                                events), deps=tuple(prior[-1:]), resources=stage_res))
    engines = recipe.eval.engine_list()
    entries = [("baseline", Path(base_dir), ())] + [
        (t["name"], Path(t["model_dir"]), (made_by[str(t["model_dir"])],)) for t in targets]
    for name, d, deps in entries:
        for e in engines:
            tasks.append(Task(f"eval {name} ({e})", eval_task, (recipe, d.resolve(), e, gpus, events, name), deps=deps,
                              resources=eval_res, meta={"kind": "eval", "dir": str(d), "engine": e}))
    s = recipe.eval.speed
    for name, d, _ in entries[1:] if s is not None and s.rounds else []:
        for e in engines:
            tasks.append(Task(f"paired {name} ({e})", paired_task, (recipe, base, d.resolve(), e, gpus, events, name),
                              deps=(f"eval baseline ({e})", f"eval {name} ({e})"), resources=eval_res,
                              skip=_failed_evaluation, meta={"kind": "paired", "dir": str(d), "engine": e}))
    return tasks


def _failed_evaluation(results: list) -> str | None:
    return "an evaluation it pairs ended in an error" if any(r.get("error") for r in results) else None


def run_on_cluster(recipe: Recipe, run_dir: Path, base_dir: Path, ex: Execution, evaluate: bool = True):
    """Stages (and, with `evaluate`, evaluations and paired speeds) as tasks on the connected
    cluster. Returns (the chains that completed, as run_stages gives them; what was measured,
    for evaluate_and_report; one line per task that failed or was skipped)."""
    store = Path(ex.store).resolve() if ex.store else None
    done = run_stages(recipe, run_dir, "cpu", base_dir, store=store, run=False)  # lays out the directories
    gpus = recipe.device != "cpu" and (recipe.device.startswith("cuda") or cluster.has_gpus())
    events = (run_dir / "events.jsonl").resolve()
    tasks = plan(recipe, done, base_dir, gpus, ex, events)
    if not evaluate:
        tasks = [t for t in tasks if t.id.startswith("stages ")]
    kinds = {}  # one check (and one line) per distinct need
    for t in tasks:
        kinds.setdefault(tuple(sorted(t.resources.items())), (f"task {t.id!r}", t.resources))
    cluster.check_resources([v for v in kinds.values() if any(v[1].values())])
    env = cluster.run_env(store)
    cluster.probe([run_dir, *([store] if store else []), Path(env["SQUEEZE_EVAL_CACHE"])], [base_dir])
    ran = run_tasks(tasks, env=env, threads=ex.threads, max_retries=ex.max_retries,
                    tasks_json=run_dir / "tasks.json", log=lambda s: log(f"[cluster] {s}"),
                    header={"cluster": ex.cluster, "store": str(store) if store else None})
    measured = {(t.meta["kind"], t.meta["dir"], t.meta["engine"]): t.result if t.state == "done" else
                {"engine": t.meta["engine"], "error": f"its task failed: {t.error}"}
                for t in ran.values() if t.meta and t.state in ("done", "failed")}
    failed = [f"task {t.id} {t.state}: {t.error}" for t in ran.values() if t.state in ("failed", "skipped")]
    complete = [c for c in done if c[2] and all(is_complete(o) for o in c[2])]
    return complete, measured, failed
