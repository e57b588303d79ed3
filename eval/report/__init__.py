"""Reports: report.json (versioned schema) and report.md (baseline-vs-artifact table)."""
