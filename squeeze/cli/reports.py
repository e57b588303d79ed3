"""`squeeze compare` and `squeeze gate`: the commands that read finished reports and measure
nothing again."""

from __future__ import annotations

from pathlib import Path

from compress.errors import UserError


def cmd_compare(a) -> int:
    from eval.report.compare import compare
    from eval.report.tables import markdown, write_comparison

    groups = compare(a.runs, quality=a.quality, only=a.only, memory=a.memory)
    print(markdown(groups))
    if a.output:
        paths = write_comparison(groups, a.output)
        print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0

def cmd_gate(a) -> int:
    from compress.fsutil import atomic_write_text
    from eval.report.compare import load_report
    from eval.report.gate import apply_gate, junit_xml, load_gate, parse_gate, verdict_lines

    report = load_report(a.report)
    if a.gate:
        criteria, where = load_gate(a.gate), a.gate
    elif (report.get("recipe") or {}).get("gate"):
        criteria, where = parse_gate(report["recipe"]["gate"], f"{report['_path']} (recipe.gate)"), "recipe.gate"
    else:
        raise UserError(f"{a.report}: its recipe has no gate; pass --gate FILE")
    gate = apply_gate(report, criteria, where)
    print("\n".join(verdict_lines(gate)))
    if a.junit:
        atomic_write_text(Path(a.junit), junit_xml(gate, f"squeeze gate: {Path(report['_path']).parent.name}"))
    return 0 if gate["passed"] else 1
