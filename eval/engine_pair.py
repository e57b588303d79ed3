"""The two engines of a paired speed measurement (eval.paired opens them, eval.speed.paired's
rounds use them): both open, or one at a time, the other closed or asleep."""

from __future__ import annotations

from eval.evaluate import one_line
from eval.speed.paired import SIDES


def _memory_error(e: BaseException) -> bool:
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "memory" in str(e).lower()


def _other(side: str) -> str:
    return SIDES[1 - SIDES.index(side)]


class EnginePair:
    """The baseline's and an artifact's engines: both open (`coexist`), or one at a time, the
    other closed or (`sleeps`) asleep."""

    def __init__(self, opener, dirs: dict, coexist: bool, open_engines: dict | None = None, sleeps: bool = False):
        self.opener, self.dirs, self.coexist = opener, dirs, coexist
        self.eng = {s: (open_engines or {}).get(s) for s in SIDES}
        self.vocab = {s: e.vocab_size for s, e in self.eng.items() if e is not None}
        self.loads, self.why = 0, ""
        # one at a time, the side not measured sleeps (its engine's sleep/wake) instead of closing
        self.sleeps, self.asleep, self.wakes = sleeps and not coexist, set(), dict.fromkeys(SIDES, 0)

    @property
    def keeps_instances(self) -> bool:
        """Whether an engine serves more than one round: both open, or asleep in between."""
        return self.coexist or self.sleeps

    def is_open(self, side: str) -> bool:
        """Open and awake."""
        return self.eng[side] is not None and side not in self.asleep

    def _make_room(self, side: str) -> None:
        """One at a time: the other side sleeps, or closes, before `side` runs."""
        other = _other(side)
        if self.coexist or not self.is_open(other):
            return
        if self.sleeps:
            self.eng[other].sleep()
            self.asleep.add(other)
        else:
            self.close(other)

    def vocab_size(self, side: str) -> int:
        """The token ids `side` accepts (opening it where not seen yet)."""
        if side not in self.vocab:
            self.vocab[side] = self.get(side).vocab_size
        return self.vocab[side]

    def get(self, side: str):
        if side in self.asleep:
            self._make_room(side)
            self.eng[side].wake()
            self.asleep.discard(side)
            self.wakes[side] += 1
        if self.eng[side] is None:
            other = _other(side)
            self._make_room(side)
            try:
                self.eng[side] = self.opener(self.dirs[side])
            except Exception as e:  # noqa: BLE001 - a second engine that does not fit: one at a time
                if self.sleeps and self.eng[other] is not None:  # what the sleeping one still holds: close it
                    failed = f"opening beside a sleeping engine failed: {one_line(e)}"
                    self.sleeps, self.why = False, f"{self.why}; {failed}" if self.why else failed
                elif self.coexist and self.eng[other] is not None and _memory_error(e):
                    self.coexist, self.why = False, f"opening the second failed: {one_line(e)}"
                else:
                    raise
                self.close(other)
                self.eng[side] = self.opener(self.dirs[side])
            self.loads += 1
            self.vocab[side] = self.eng[side].vocab_size
        return self.eng[side]

    def reopen(self, side: str) -> None:
        """Close `side` and open a new instance of it (the protocol's half-time swap); one awake
        at a time, the new one opens when its side is next measured (no extra switch)."""
        self.close(side)
        if not self.sleeps:
            self.get(side)

    def close(self, side: str) -> None:
        self.asleep.discard(side)
        if self.eng[side] is not None:
            self.eng[side].close()
            self.eng[side] = None
