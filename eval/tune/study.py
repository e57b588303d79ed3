"""A tuning study: search an engine's settings for one model under a trial budget.

Strategies: `grid` (every point, or a seeded random subset when the budget is smaller),
`random` (distinct points at random) and `tpe` (optuna's Bayesian TPE sampler, multivariate).
All three run through one optuna study stored in SQLite, so a study killed midway resumes
where it stopped: the same command finds the study (its name hashes the engine, space,
strategy, objective, workload, repeats, seed and the GPU), marks a trial the kill interrupted as
failed and measures its point again. The engine's defaults are measured once per study
first, so the gain of the best setting is measured in the same session, with its noise.

A trial that crashes, runs out of memory or whose server fails to start is recorded as a
failed trial with its one-line error and the study goes on; Ctrl-C and SIGTERM stop it
(the server is killed) and keep every finished trial. A setting TPE proposes again is not
re-measured: its earlier result is told once more, and only measured trials use the budget.

Studies live per (model, engine, GPU): <SQUEEZE_HOME>/tune/<model>-<hash>/<engine>/<gpu>/,
so tuning results of one GPU never pass for another's, and a change of GPU is re-tunable.

Trials in parallel (`run(executor=..., parallel=N)`, `squeeze tune --cluster`): N trials are
measured at once, each through `executor.submit` (a concurrent.futures-style executor: the CLI
gives one whose every call is a Ray task on a GPU of its own, squeeze.pipeline.cluster); this
process asks and tells optuna, TPE with its constant liar so that settings in flight are not
proposed again. Such a study is kept in optuna's journal file (`study.journal`, on a directory
every node mounts), which several processes may share; a sequential study stays in SQLite.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from compress.models import home, load_tokenizer, model_hash
from compress.spec import ModelSpec
from eval.config import TuneConfig, VLLMOptions
from eval.engines import check_engines
from eval.evaluate import hardware, one_line
from eval.tune import space as sp
from eval.tune.trials import INTERRUPTED, OBJECTIVES, TRIALS, free_gpu, score, trial_line

MAX_ASKS_PER_TRIAL = 20  # TPE proposals of already-measured points before the space counts as exhausted


def check_tune(cfg: TuneConfig, device: str) -> dict[str, list]:
    """Everything about a study checkable before any work; returns its search space."""
    check_engines([cfg.engine])
    TRIALS[cfg.engine].check(cfg)
    return sp.check_space(cfg.engine, cfg.space if cfg.space is not None else sp.builtin_space(cfg.engine, device))


def study_dir(model_dir: Path, engine: str, device: str) -> Path:
    """Where the studies of (model, engine, GPU) live."""
    gpu = re.sub(r"[^A-Za-z0-9._]+", "-", hardware())
    return home() / "tune" / f"{Path(model_dir).name}-{model_hash(model_dir)[:10]}" / engine / gpu.strip("-")


def study_name(cfg: TuneConfig, space: dict, base: dict) -> str:
    ident = {"engine": cfg.engine, "hardware": hardware(), "space": space, "strategy": cfg.strategy,
             "objective": cfg.objective,
             "floor": cfg.throughput_floor, "workload": cfg.workload.model_dump(), "repeats": cfg.repeats,
             "seed": cfg.seed, "base": base}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.engine}-{cfg.strategy}-{cfg.objective}-{digest}"


def _distributions(space: dict) -> dict:
    from optuna.distributions import CategoricalDistribution

    return {k: CategoricalDistribution([json.dumps(v) for v in vals]) for k, vals in space.items()}


def _settings(params: dict) -> dict:
    return {k: json.loads(v) for k, v in params.items()}


def _sampler(cfg: TuneConfig, parallel: int = 1):
    import optuna

    if cfg.strategy == "tpe":
        kw = {} if hasattr(optuna.trial.Trial, "set_constraint") else \
            {"constraints_func": lambda t: [t.user_attrs.get("violation", 0.0)]}  # optuna < 5
        return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, n_startup_trials=max(2, cfg.budget // 4),
                                          constant_liar=parallel > 1, **kw)
    return optuna.samplers.RandomSampler(seed=cfg.seed)  # grid/random: the points are enqueued


class Study:
    """One study over one model (see the module docstring). `run()` returns the landscape."""

    def __init__(self, model_dir: Path, cfg: TuneConfig, model: ModelSpec = ModelSpec(),
                 vllm: VLLMOptions = VLLMOptions(), device: str = "cpu", out_dir: Path | None = None,
                 progress: bool = True, log=print, server_extra: dict | None = None):
        self.model_dir, self.cfg, self.model, self.device = Path(model_dir), cfg, model, device
        self.args = {"model_dir": self.model_dir, "cfg": cfg, "model": model, "vllm": vllm, "device": device,
                     "out_dir": out_dir, "server_extra": server_extra}  # the same study, rebuilt in a worker
        self.journal, self.parallel = False, 1  # run() sets them: optuna's journal file, trials at once
        self.space = check_tune(cfg, device)
        self.trials = TRIALS[cfg.engine]
        # server_extra: more vLLM engine arguments for every trial (e.g. load_format: dummy)
        self.base = self.trials.base(vllm, model, device, server_extra)
        self.root = Path(out_dir) if out_dir else study_dir(self.model_dir, cfg.engine, device)
        self.name = study_name(cfg, self.space, self.base)
        self.dir = self.root / self.name
        self.progress, self.log = progress, log
        self._tokenizer = None

    # -- measuring -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use (server trials send token ids)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir, self.model.trust_remote_code)
        return self._tokenizer

    def measure(self, settings: dict, label: str) -> dict:
        """Figures for one setting; {"error": ...} if it failed (crash, OOM, no server)."""
        t0 = time.perf_counter()
        try:
            m = self.trials.measure(self, settings, label)
            return {**m, **score(m, self.cfg), "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - a failed trial is a result (OOM, bad setting, no server)
            free_gpu()
            return {"error": one_line(e), "seconds": time.perf_counter() - t0}

    # -- the study -------------------------------------------------------------------------
    def _open(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.journal:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            storage = JournalStorage(JournalFileBackend(str(self.root / "study.journal")))
        else:
            storage = f"sqlite:///{self.root / 'study.db'}"
        direction = OBJECTIVES[self.cfg.objective][0]
        study = optuna.create_study(study_name=self.name, storage=storage, direction=direction,
                                    sampler=_sampler(self.cfg, self.parallel), load_if_exists=True)
        return study

    def _recover(self, study) -> None:
        """Trials a kill left running are failed ('interrupted') and their points queued again."""
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(t._trial_id, "error", INTERRUPTED)  # no public setter once asked
            study.tell(t.number, state=TrialState.FAIL)
            self.log(f"trial {t.number} was interrupted; its setting is measured again")
            study.enqueue_trial(t.params, skip_if_exists=False)

    def _plan(self) -> list[dict]:
        if self.cfg.strategy == "grid":
            pts = sp.grid(self.space)
            return pts if len(pts) <= self.cfg.budget else sp.sample(self.space, self.cfg.budget, self.cfg.seed)
        if self.cfg.strategy == "random":
            return sp.sample(self.space, self.cfg.budget, self.cfg.seed)
        return []

    def run(self, executor=None, parallel: int = 1) -> dict:
        """Measure the defaults and the budget's trials; the landscape. With an `executor`
        (concurrent.futures-style), up to `parallel` measurements run at once through it."""
        from optuna.trial import TrialState
        from tqdm.auto import tqdm

        from eval.tune.landscape import landscape, write_landscape

        self.parallel, self.journal = max(1, parallel), executor is not None
        self._submit = (lambda settings, label: executor.submit(measure_setting, self.args, settings, label)) \
            if executor is not None else (lambda settings, label: _finished(self.measure(settings, label)))
        study = self._open()
        self._recover(study)
        inflight = {}  # future -> (trial or None for the defaults, settings, key)
        if "defaults" not in study.user_attrs:
            self.log(f"measuring the engine's defaults ({self.cfg.engine}, {self.device})")
            inflight[self._submit({}, "defaults")] = (None, {}, None)
            if executor is None:
                self._collect(study, inflight, {}, None)
        measured = self._measured(study)
        grid_size = len(sp.grid(self.space))
        if self.cfg.strategy == "grid" and grid_size > self.cfg.budget:
            self.log(f"grid of {grid_size} points, budget {self.cfg.budget}: a random {self.cfg.budget} of them")
        if measured:
            self.log(f"resuming study {self.name}: {len(measured)} of {self.cfg.budget} trials measured")
        queued = {sp.key(_settings(t.params)) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        for pt in self._plan():
            k = sp.key(pt)
            if k not in measured and k not in queued:
                study.enqueue_trial({n: json.dumps(v) for n, v in pt.items()})
        bar = tqdm(total=min(self.cfg.budget, grid_size), initial=len(measured), desc=f"tune {self.cfg.engine}",
                   unit="trial", disable=not self.progress)
        try:
            while self._ask(study, inflight, measured, min(self.cfg.budget, grid_size)) or inflight:
                self._collect(study, inflight, measured, bar)
        finally:
            bar.close()
            result = landscape(self, study)
            write_landscape(result, self.dir)
        return result

    def _ask(self, study, inflight: dict, measured: dict, target: int) -> bool:
        """Start trials until `parallel` are in flight or the budget is spoken for; False when
        no more will start (budget, a grid or random plan used up, a sampler that repeats itself)."""
        from optuna.trial import TrialState

        dists = _distributions(self.space)
        while len(inflight) < self.parallel:
            if len(measured) + sum(t is not None for t, _, _ in inflight.values()) >= target:
                return False
            if self.cfg.strategy != "tpe" and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                return False
            trial = study.ask(dists)
            settings = _settings(trial.params)
            k = sp.key(settings)
            running = next((t.number for t, _, key in inflight.values() if key == k and t is not None), None)
            if k in measured or running is not None:  # proposed again: tell its result, measure nothing
                self._asks = getattr(self, "_asks", 0) + 1
                self._tell(study, trial, measured[k] if k in measured else {"error": "proposed while being measured"},
                           repeat_of=measured[k]["number"] if k in measured else running)
                if self._asks > MAX_ASKS_PER_TRIAL * self.cfg.budget:
                    self.log("the sampler keeps proposing measured settings; stopping early")
                    return False
                continue
            inflight[self._submit(settings, f"t{trial.number}")] = (trial, settings, k)
        return True

    def _collect(self, study, inflight: dict, measured: dict, bar) -> None:
        """Tell optuna the measurements that finished (waiting for the first of them)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        for f in done:
            trial, settings, k = inflight.pop(f)
            try:
                m = f.result()
            except Exception as e:  # noqa: BLE001 - its worker died on every try: a failed trial
                m = {"error": one_line(e), "seconds": None}
            if trial is None:
                study.set_user_attr("defaults", m)
                continue
            m["number"] = trial.number
            self._tell(study, trial, m)
            measured[k] = m
            bar.update(1)
            self.log(trial_line(trial.number, settings, m, self.cfg.objective))

    def _tell(self, study, trial, m: dict, repeat_of: int | None = None) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("measurement", m)
        if repeat_of is not None:
            trial.set_user_attr("repeat_of", repeat_of)
        if "error" in m:
            trial.set_user_attr("error", m["error"])
            study.tell(trial, state=TrialState.FAIL)
            return
        trial.set_user_attr("violation", m["violation"])
        if hasattr(trial, "set_constraint"):  # a setting below the throughput floor is infeasible for TPE
            trial.set_constraint("throughput_floor", m["violation"])
        study.tell(trial, m["value"])

    def _measured(self, study) -> dict[str, dict]:
        from optuna.trial import TrialState

        out = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            m = t.user_attrs.get("measurement")
            if m is not None and "repeat_of" not in t.user_attrs and t.user_attrs.get("error") != INTERRUPTED:
                out[sp.key(_settings(t.params))] = {**m, "number": t.number}
        return out


def _finished(value):
    """A future that is done already (a measurement made in this process)."""
    from concurrent.futures import Future

    f = Future()
    f.set_result(value)
    return f


def measure_setting(args: dict, settings: dict, label: str) -> dict:
    """One trial measured in another process (a worker of `run`'s executor): the same study
    rebuilt from its arguments, its result returned."""
    return Study(**args, progress=False, log=print).measure(settings, label)
