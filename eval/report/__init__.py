"""Reports: the run report (report.json, report.md, report.html), comparisons across runs,
the release gate and model cards.

Each module imports only modules listed on lines before its own (the lowest first):
  cells, coverage, pareto   a figure as a table cell; a weight stage's coverage; Pareto sets and axes
  compare                   report.json loaded, flattened to one row per (model, engine), grouped
  columns, lines            the comparison table's columns; the run report's bullet lines
  charts, gate              the Pareto charts; the release gate and its JUnit XML
  html                      report.html and comparison.html
  report, tables            the run report built and written; the comparison's Markdown, CSV and files
  card                      a model card per artifact, from the run's report
"""
