"""Self-contained HTML: the run report (report.html) and the comparison (comparison.html).

One file, no network: CSS and a few lines of script inline, the Pareto charts as inline SVG
(eval.report.charts). Tables sort on a click on their header; pointing at a row highlights
its points in the charts and the reverse.
"""

from __future__ import annotations

import html
import json

from eval.report.charts import pareto_figure
from eval.report.columns import columns
from eval.report.compare import Group, compare_reports, run_label
from eval.report.lines import notes, protocol_lines

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
 padding:0 16px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px} .muted{color:#666}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 7px;text-align:right;white-space:nowrap}
th{background:#f4f4f6;cursor:pointer;user-select:none} th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}
tr.base td{background:#f3faf3} tr.opt td:last-child{color:#b22;font-weight:600} tr.hi td{background:#fff4cc}
.gate{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:600}
.pass{background:#e6f4e6;border:1px solid #7b7} .fail{background:#fbe9e9;border:1px solid #d88}
.chart svg{max-width:100%;height:auto} .chart g.hi path{stroke:#f90 !important;stroke-width:3 !important}
ul{margin:4px 0 8px 18px;padding:0} details{margin:8px 0} code{background:#f4f4f6;padding:0 3px}
"""

SCRIPT = """
(function(){
  function num(t){var m=t.replace(/[,\\s]/g,'').match(/^[+-]?\\d+(\\.\\d+)?/);return m?parseFloat(m[0]):null;}
  document.querySelectorAll('table.sortable').forEach(function(tbl){
    tbl.querySelectorAll('th').forEach(function(th,col){
      th.addEventListener('click',function(){
        var body=tbl.tBodies[0], rows=Array.prototype.slice.call(body.rows), asc=th.dataset.dir!=='asc';
        rows.sort(function(a,b){
          var x=a.cells[col].textContent, y=b.cells[col].textContent, nx=num(x), ny=num(y);
          var c=(nx!==null&&ny!==null)?nx-ny:x.localeCompare(y);
          return asc?c:-c;});
        rows.forEach(function(r){body.appendChild(r);});
        tbl.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;});
        th.dataset.dir=asc?'asc':'desc';
      });
    });
  });
  function mark(group,row,on){
    document.querySelectorAll('[data-group="'+group+'"] [id$="-'+row+'"]').forEach(function(g){
      if(/^point-/.test(g.id)){g.classList.toggle('hi',on);}});
    var tr=document.querySelector('[data-group="'+group+'"] tr[data-row="'+row+'"]');
    if(tr){tr.classList.toggle('hi',on);}
  }
  document.querySelectorAll('[data-group]').forEach(function(sec){
    var group=sec.dataset.group;
    sec.querySelectorAll('tr[data-row]').forEach(function(tr){
      tr.addEventListener('mouseenter',function(){mark(group,tr.dataset.row,true);});
      tr.addEventListener('mouseleave',function(){mark(group,tr.dataset.row,false);});
    });
    sec.querySelectorAll('g[id^="point-"]').forEach(function(g){
      var row=g.id.split('-').pop();
      g.addEventListener('mouseenter',function(){mark(group,row,true);});
      g.addEventListener('mouseleave',function(){mark(group,row,false);});
    });
  });
})();
"""

e = html.escape


def table_html(rows: list[dict]) -> str:
    cols = columns(rows)
    head = "".join(f"<th>{e(h)}</th>" for h, _ in cols)
    body = []
    for n, r in enumerate(rows):
        cls = " ".join(c for c, on in (("base", r["baseline"]), ("opt", any(r.get("pareto", {}).values()))) if on)
        cells = "".join(f"<td>{e(str(f(r)))}</td>" for _, f in cols)
        body.append(f'<tr data-row="{n}" class="{cls}">{cells}</tr>')
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def group_section(g: Group, gi: int, n_groups: int) -> str:
    parts = [f'<section data-group="{gi}">']
    if n_groups > 1:
        parts.append(f"<h2>Group {gi + 1}</h2>")
    parts.append(f'<p class="muted">Runs: {e(", ".join(run_label(r) for r in g.reports))}</p>')
    if g.reason:
        parts.append(f"<p><b>Not compared with group 1:</b> {e(g.reason)}.</p>")
    parts.append(f'<div class="chart">{pareto_figure(g)}</div>')
    parts.append('<p class="muted">Stars: Pareto-optimal on that engine (nothing else is at least as good on both '
                 'axes and better on one); green: the baseline. A model missing either figure is not placed.</p>')
    parts.append(table_html(g.rows))
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f"<body>\n{body}\n<script>{SCRIPT}</script></body></html>\n")


def comparison_page(groups: list[Group]) -> str:
    body = ["<h1>Squeeze comparison</h1>",
            f'<p class="muted">{sum(len(g.reports) for g in groups)} run(s) in {len(groups)} group(s); runs are '
            "compared only where the baseline and the measurement protocol are the same.</p>"]
    body += [group_section(g, gi, len(groups)) for gi, g in enumerate(groups)]
    return page("Squeeze comparison", "\n".join(body))


def _kv(d: dict) -> str:
    return "<ul>" + "".join(f"<li><b>{e(str(k))}</b>: {e(v if isinstance(v, str) else json.dumps(v, default=str))}"
                            "</li>" for k, v in d.items() if v not in (None, {}, [])) + "</ul>"


def gate_html(gate: dict | None) -> str:
    if not gate:
        return ""
    ok = gate["passed"]
    lines = "".join(f"<li>{'PASS' if v['passed'] else '<b>FAIL</b>'}: {e(v['criterion'])} on {e(v['artifact'])} "
                    f"({e(v['engine'])}): {e(v['detail'])}</li>" for v in gate["verdicts"])
    return (f'<div class="gate {"pass" if ok else "fail"}">Release gate: {"PASSED" if ok else "FAILED"}</div>'
            f"<ul>{lines}</ul>")


def report_page(report: dict) -> str:
    """report.html of one run: gate, charts, table, protocol, provenance, notes."""
    title = (report.get("recipe") or {}).get("name", "evaluation")
    (g,) = compare_reports([{**report, "_path": "report.json"}])
    prov = report.get("provenance") or {}
    body = [f"<h1>Squeeze report: {e(title)}</h1>",
            f'<p class="muted">{e(report.get("created", ""))}, squeeze {e(report.get("squeeze_version", "?"))}, '
            f"report schema {report.get('schema_version')}</p>",
            gate_html(report.get("gate")), group_section(g, 0, 1),
            "<h2>Protocol</h2><ul>" + "".join(f"<li>{e(x[2:])}</li>" for x in protocol_lines(report)) + "</ul>",
            "<h2>Notes</h2><ul>" + "".join(f"<li>{e(x[2:])}</li>" for x in notes(report)) + "</ul>",
            "<h2>Provenance</h2>" + _kv({k: v for k, v in prov.items() if k not in ("host", "versions")}),
            "<details open><summary>Host</summary>" + _kv(prov.get("host") or {}) + "</details>",
            "<details><summary>Versions</summary>" + _kv(prov.get("versions") or {})
            + "</details>"]
    return page(f"Squeeze report: {title}", "\n".join(body))
