"""The main job run N times in a row, each from nothing (its own SQUEEZE_HOME: no cached stage,
evaluation or pair), and the paired speed columns of every run side by side, checked against
what a release gate needs from them on a machine that is otherwise idle:

- every dense-kernel variant (magnitude-50, wanda-50) reads "no measurable change" on both
  engines, throughput and batch-1 TPOT, with a range no wider than --max-width (high / low);
- the int8 variant's vLLM throughput range excludes 1.

    python benchmarks/demo_repeat.py [--runs 5] [--home /tmp/demo-repeat] [--jsonl FILE]

Each run is `bash recipes/demo.sh` (extra arguments after `--` go to it); one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DENSE = ("magnitude-50", "wanda-50")


def speed_cells(report: dict) -> dict:
    """{(variant, engine, metric): {ratio, lo, hi, verdict, rounds, coverage, ratios}} from a report.json."""
    out = {}
    for a in report["artifacts"]:
        name = a["name"].split(" ")[0]
        for eng, ret in (a.get("retention") or {}).items():
            for metric, r in (ret.get("speed") or {}).items():
                out[(name, eng, metric)] = {k: r.get(k) for k in ("ratio", "lo", "hi", "verdict", "rounds", "coverage", "ratios")}
    return out


def problems(cells: dict, max_width: float) -> list[str]:
    bad = []
    for (name, eng, metric), r in sorted(cells.items()):
        if name in DENSE:
            if r["verdict"] != "no measurable change":
                bad.append(f"{name} {eng} {metric}: {r['verdict']}")
            if r["lo"] and r["hi"] / r["lo"] > max_width:
                bad.append(f"{name} {eng} {metric}: range {r['lo']:.2f}-{r['hi']:.2f} wider than {max_width}")
    int8 = cells.get(("w8a8-int8", "vllm", "throughput"))
    if not int8 or not int8["lo"] > 1.0:
        bad.append(f"w8a8-int8 vllm throughput: range {int8 and (int8['lo'], int8['hi'])} does not exclude 1")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--home", default="/tmp/demo-repeat", help="run K uses HOME/runK as SQUEEZE_HOME")
    p.add_argument("--max-width", type=float, default=1.3)
    p.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "results" / "demo_repeat_cpu.jsonl"))
    p.add_argument("demo_args", nargs="*", help="after --: arguments for recipes/demo.sh")
    a = p.parse_args()
    rows, failed = [], 0
    for k in range(1, a.runs + 1):
        home = Path(a.home) / f"run{k}"
        env = {**os.environ, "SQUEEZE_HOME": str(home)}
        t0 = time.perf_counter()
        r = subprocess.run(["bash", str(ROOT / "recipes" / "demo.sh"), *a.demo_args], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        secs = time.perf_counter() - t0
        rep_path = home / "demo" / "report.json"
        if not rep_path.is_file():
            print(f"run {k}: no report (exit {r.returncode}); stderr tail:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        report = json.loads(rep_path.read_text())
        cells = speed_cells(report)
        bad = problems(cells, a.max_width)
        failed += bool(bad)
        rec = {"what": "demo repeat", "run": k, "exit": r.returncode, "seconds": round(secs, 1),
               "cells": {" ".join(key): v for key, v in cells.items()}, "problems": bad,
               "host": platform.node(), "cpus": os.cpu_count(), "command": "python benchmarks/demo_repeat.py",
               # the CPU model and software stack the figures belong to (the report's provenance)
               "provenance": {k: report.get("provenance", {}).get(k) for k in ("host", "versions", "git_sha")}}
        rows.append(rec)
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"run {k}: exit {r.returncode}, {secs / 60:.1f} min, {'ok' if not bad else '; '.join(bad)}", flush=True)
    keys = sorted({key for rec in rows for key in rec["cells"]})
    print("\n| variant engine metric | " + " | ".join(f"run {rec['run']}" for rec in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        cells = [rec["cells"].get(key) for rec in rows]
        print(f"| {key} | " + " | ".join(f"{c['ratio']:.2f}x ({c['lo']:.2f}-{c['hi']:.2f}) {c['verdict']}" if c else "–"
                                         for c in cells) + " |")
    print(f"\n{a.runs - failed} of {a.runs} runs meet every check")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
