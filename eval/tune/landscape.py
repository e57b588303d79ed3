"""A study's landscape: every trial as a table, a plot, the best setting and its gain.

Files written beside the study (atomically, after every run of it, a stopped one too):
landscape.json (everything below), landscape.md and .csv (one row per trial, the defaults
first), landscape.png (a heatmap of the objective over the two settings that move it most,
each cell the best over the other settings, next to the best-so-far curve over the trials)
and best.json (the setting, its gain over the defaults with the noise range, and the
ready-to-paste `vllm serve` line or HF keyword set).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from compress.fsutil import atomic_write_text
from eval.speed.workload import compare, fmt_speedup
from eval.tune.trials import INTERRUPTED, OBJECTIVES, fmt_value


def landscape(st, study) -> dict:
    """The result of Study `st` from its optuna `study` (see the module docstring)."""
    from optuna.trial import TrialState

    direction, unit = OBJECTIVES[st.cfg.objective]
    trials = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            continue
        m = t.user_attrs.get("measurement") or {}
        row = {"number": t.number, "settings": {k: json.loads(v) for k, v in t.params.items()},
               "state": _state(t), "error": t.user_attrs.get("error")}
        if "spread" in m:
            row.update(value=m["spread"]["median"], min=m["spread"]["min"], max=m["spread"]["max"],
                       runs=m["spread"]["runs"], throughput=m["throughput"]["median"], feasible=m["feasible"],
                       seconds=m.get("seconds"), note=m.get("note"), kernels=m.get("kernels") or None)
        trials.append(row)
    defaults = study.user_attrs.get("defaults") or {}
    ok = [t for t in trials if t["state"] == "ok" and t.get("feasible")]
    sign = 1 if direction == "maximize" else -1
    best = max(ok, key=lambda t: (sign * t["value"], -t["number"]), default=None)
    gain = None
    if best and "spread" in defaults:
        gain = compare(defaults["spread"], {"median": best["value"], "min": best["min"], "max": best["max"],
                                            "runs": best["runs"]}, higher_is_better=direction == "maximize")
    return {"study": st.name, "engine": st.cfg.engine, "device": st.device, "hardware": _hardware(),
            "model": str(st.model_dir), "strategy": st.cfg.strategy, "objective": st.cfg.objective,
            "direction": direction, "unit": unit, "budget": st.cfg.budget, "repeats": st.cfg.repeats,
            "space": st.space, "base": st.base, "workload": st.cfg.workload.model_dump(mode="json"),
            "defaults": _defaults_row(defaults), "trials": trials,
            "measured": sum(t["state"] in ("ok", "failed") for t in trials),
            "failed": sum(t["state"] == "failed" for t in trials), "best": best, "gain": gain,
            "apply": _apply(st, best)}


def _state(t) -> str:
    from optuna.trial import TrialState

    if "repeat_of" in t.user_attrs:
        return "repeat"  # a point proposed again: its earlier result was told, nothing measured
    if t.user_attrs.get("error") == INTERRUPTED:
        return "interrupted"
    return "failed" if t.state == TrialState.FAIL else "ok"


def _hardware() -> str:
    from eval.evaluate import hardware

    return hardware()


def _defaults_row(d: dict) -> dict:
    if "spread" not in d:
        return {"error": d.get("error", "not measured")}
    return {"value": d["spread"]["median"], "min": d["spread"]["min"], "max": d["spread"]["max"],
            "runs": d["spread"]["runs"], "throughput": d["throughput"]["median"], "feasible": d["feasible"]}


def _apply(st, best: dict | None) -> dict | None:
    """How to use the best setting: a `vllm serve` line, or the HF engine's keywords."""
    if best is None:
        return None
    return st.trials.apply(st.model_dir, st.base, best["settings"])


def markdown(res: dict) -> str:
    names = list(res["space"])
    unit = res["unit"]
    head = ["trial", *names, f"{unit} (median)", "min-max", "output tok/s", "status"]
    lines = [f"## Tuning: {res['engine']} on {res['hardware']} ({res['strategy']}, objective {res['objective']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    d = res["defaults"]
    if "value" in d:
        lines.append("| defaults | " + " | ".join("–" for _ in names) +
                     f" | {fmt_value(d['value'])} | {fmt_value(d['min'])}-{fmt_value(d['max'])} | "
                     f"{fmt_value(d['throughput'])} | defaults |")
    else:
        lines.append("| defaults | " + " | ".join("–" for _ in names) + f" | – | – | – | failed: {d['error']} |")
    rank = sorted((t for t in res["trials"] if t["state"] in ("ok", "failed")),
                  key=lambda t: (t["state"] != "ok", -(t.get("value") or 0) if res["direction"] == "maximize"
                                 else (t.get("value") or 0)))
    for t in rank:
        cells = [str(t["number"]), *(_cell(t["settings"].get(n)) for n in names)]
        if t["state"] == "ok":
            status = "best" if res["best"] and t["number"] == res["best"]["number"] else \
                ("ok" if t["feasible"] else "below floor")
            cells += [fmt_value(t["value"]), f"{fmt_value(t['min'])}-{fmt_value(t['max'])}",
                      fmt_value(t["throughput"]), status + (f" ({t['note']})" if t.get("note") else "")]
        else:
            cells += ["–", "–", "–", f"failed: {t['error']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *summary_lines(res)]
    return "\n".join(lines) + "\n"


def summary_lines(res: dict) -> list[str]:
    return [f"{res['measured']} trials measured ({res['failed']} failed) of a budget of {res['budget']}, "
            f"{res['repeats']} repeats each.", *recommendation(res)]


def recommendation(res: dict) -> list[str]:
    """The best setting, its gain over the defaults, and how to use it (or why there is none)."""
    b = res["best"]
    if b is None:
        return ["No trial succeeded" + ("" if res["objective"] != "p99_latency" else " above the throughput floor")
                + "; nothing to recommend."]
    s = ", ".join(f"{k}={_cell(v)}" for k, v in b["settings"].items())
    ran = "; ".join(f"{k} for {scheme}" for scheme, k in (b.get("kernels") or {}).items())
    out = [f"Best: trial {b['number']} ({s}): {fmt_value(b['value'])} {res['unit']}; over the defaults: "
           f"{fmt_speedup(res['gain']) if res['gain'] else 'defaults not measured'}."
           + (f" Its linear kernels (the server's log): {ran}." if ran else "")]
    if res["gain"] and res["gain"]["verdict"] == "slower":
        return out + ["The defaults beat every setting tried: keep them (or widen the space)."]
    if res["gain"] and res["gain"]["ratio"] < 1:
        return out + ["The defaults' median is higher, inside the noise: keep them (or widen the space)."]
    ap = res["apply"]
    return out + [f"Use it: `{ap['vllm_serve']}`" if "vllm_serve" in ap else
                  f"Use it: HF engine keywords {json.dumps(ap['hf'])}"]


def _cell(v) -> str:
    return json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)


def csv_text(res: dict) -> str:
    names = list(res["space"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", *names, "state", "value", "min", "max", "output_tok_s", "feasible", "error"])
    d = res["defaults"]
    w.writerow(["defaults", *["" for _ in names], "ok" if "value" in d else "failed", d.get("value"), d.get("min"),
                d.get("max"), d.get("throughput"), d.get("feasible"), d.get("error")])
    for t in res["trials"]:
        w.writerow([t["number"], *(_cell(t["settings"].get(n)) for n in names), t["state"], t.get("value"),
                    t.get("min"), t.get("max"), t.get("throughput"), t.get("feasible"), t.get("error")])
    return buf.getvalue()


def plot(res: dict, path: Path) -> Path | None:
    """landscape.png: heatmap (or bars, for one setting) and the best-so-far curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [t for t in res["trials"] if t["state"] == "ok"]
    if not ok:
        return None
    names = _movers(res, ok)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    better = max if res["direction"] == "maximize" else min
    if len(names) == 1:
        vals = res["space"][names[0]]
        ys = [better([t["value"] for t in ok if t["settings"].get(names[0]) == v], default=np.nan) for v in vals]
        ax.bar([_cell(v) for v in vals], ys, color="#4c72b0")
        ax.set_xlabel(names[0])
        ax.set_ylabel(res["unit"])
    else:
        xs, ys = res["space"][names[0]], res["space"][names[1]]
        grid = np.full((len(ys), len(xs)), np.nan)
        for t in ok:
            i, j = ys.index(t["settings"].get(names[1])), xs.index(t["settings"].get(names[0]))
            grid[i, j] = t["value"] if np.isnan(grid[i, j]) else better(grid[i, j], t["value"])
        im = ax.imshow(grid, cmap="viridis" if res["direction"] == "maximize" else "viridis_r", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "–" if np.isnan(v) else fmt_value(v), ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(xs)), [_cell(v) for v in xs])
        ax.set_yticks(range(len(ys)), [_cell(v) for v in ys])
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        fig.colorbar(im, ax=ax, label=res["unit"] + (" (best over other settings)" if len(res["space"]) > 2 else ""))
    ax.set_title(f"{res['engine']} on {res['hardware']}", fontsize=10)
    measured = sorted((t for t in res["trials"] if t["state"] in ("ok", "failed")), key=lambda t: t["number"])
    run, best_so_far = None, []
    for t in measured:
        if t["state"] == "ok" and t.get("feasible"):
            run = t["value"] if run is None else better(run, t["value"])
        best_so_far.append(np.nan if run is None else run)
    ax2.plot(range(1, len(best_so_far) + 1), best_so_far, marker="o", label=f"best so far ({res['strategy']})")
    if "value" in res["defaults"]:
        ax2.axhline(res["defaults"]["value"], color="grey", ls="--", label="defaults")
    ax2.set_xlabel("trials measured")
    ax2.set_ylabel(res["unit"])
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _movers(res: dict, ok: list[dict]) -> list[str]:
    """The (at most two) settings whose values move the objective most (range of per-value bests)."""
    def reach(n):
        per = {}
        for t in ok:
            per.setdefault(_cell(t["settings"].get(n)), []).append(t["value"])
        bests = [max(v) for v in per.values()]
        return max(bests) - min(bests) if len(bests) > 1 else -1.0

    names = [n for n in res["space"] if len(res["space"][n]) > 1] or list(res["space"])
    return sorted(names, key=reach, reverse=True)[:2]


def write_landscape(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "landscape.json", json.dumps(res, indent=1, default=str))
    atomic_write_text(out / "landscape.md", markdown(res))
    atomic_write_text(out / "landscape.csv", csv_text(res))
    best = {k: res[k] for k in ("engine", "hardware", "model", "objective", "unit", "best", "gain", "apply")}
    atomic_write_text(out / "best.json", json.dumps(best, indent=1, default=str))
    plot(res, out / "landscape.png")
