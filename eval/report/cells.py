"""How one figure reads in a report's table cell: a number in a format or '–' where it was not
measured, bytes in MiB, a quantization scheme as 'W4A16 g128'. Pure functions of their
arguments; the run report, the comparison and the model cards share them, so a figure reads
the same in each."""

from __future__ import annotations


def fmt(x, spec: str) -> str:
    """x in the format `spec`, or '–' where it was not measured (None)."""
    return "–" if x is None else format(x, spec)


def mib(x) -> str:
    """Bytes in MiB: one decimal under 10 MiB, none above; '–' for none or zero."""
    return "–" if not x else f"{x / 2**20:.1f}" if x < 10 * 2**20 else f"{x / 2**20:.0f}"


def quant_label(m: dict) -> str:
    """'W4A16 g128', 'W8A16 ch asym', 'FP8 dynamic ch, KV FP8 per tensor', 'KV FP8 per head' (16-bit
    weights), or '–' for a dense model."""
    q = m.get("quantization")
    if not q:
        return "–"
    kv = f"KV {q['kv_cache']}" if q.get("kv_cache") else ""
    if "scheme" not in q and kv:  # no weight scheme: an FP8 KV cache alone
        return kv
    if q.get("block"):  # the scheme's name says the tile ('FP8 block128 dynamic')
        return q.get("scheme", "?") + (f", {kv}" if kv else "")
    sizes = "/".join("ch" if g == -1 else f"{g}" for g in q.get("group_sizes", [q.get("group_size", -1)]))
    label = sizes if sizes == "ch" else f"g{sizes}"
    return f"{q.get('scheme', '?')} {label}{'' if q.get('symmetric', True) else ' asym'}" + (f", {kv}" if kv else "")
