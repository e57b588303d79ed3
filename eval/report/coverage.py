"""The report's lines on what a weight stage covered: the share of the decoder's weights it
changed, by module kind (compress.coverage writes them into the stage's info), the modules
that fell back to a simpler method for lack of calibration tokens, and how evenly the routers
of a mixture-of-experts model spread the calibration tokens over the experts."""

from __future__ import annotations


def coverage_lines(info: dict) -> list[str]:
    out = []
    cov = info.get("coverage") or {}
    kinds = cov.get("by_kind") or {}
    if kinds:
        parts = ", ".join(f"{k} {100 * v['changed'] / max(v['params'], 1):.0f} %" for k, v in kinds.items())
        out.append(f"changed {100 * cov['changed_fraction']:.1f} % of the decoder's weights ({parts})")
    if info.get("fallback_modules"):
        how = {m.get("fallback") for m in (info.get("modules") or {}).values() if m.get("fallback")}
        out.append(f"{info['fallback_modules']} modules saw too few calibration tokens and fell back to "
                   f"{' / '.join(sorted(how)) or 'a simpler method'}")
    routed = (info.get("experts") or {}).get("routed_tokens") or {}
    counts = sorted(c for per_layer in routed.values() for c in per_layer)
    if counts:
        out.append(f"calibration tokens routed per expert: min {counts[0]:,}, median {counts[len(counts) // 2]:,}, "
                   f"max {counts[-1]:,} over {len(counts)} experts in {len(routed)} layers"
                   + (" (statistics from every token: calibrate_all_experts)" if info["experts"].get("all_experts")
                      else ""))
    return out
