"""Where the calibration runner keeps its activations: planned from free memory before it starts.

One decoder layer, its statistics and the solver must fit on the device (else a one-line
error); the calibration activations (samples × sequence × hidden × bytes) stay on the device
when they fit beside them and go to host memory otherwise, refused when even that is short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import UserError


@dataclass
class MemoryPlan:
    activation_bytes: int       # inputs + outputs of one layer for all calibration batches
    activations_on: str         # the device, or "cpu" when they do not fit there
    device_free_bytes: int | None
    reserve_bytes: int          # what one layer + its statistics + solver need on the device

    def as_info(self) -> dict:
        gib = 1 << 30
        return {"activation_gib": round(self.activation_bytes / gib, 3), "activations_on": self.activations_on,
                "device_free_gib": None if self.device_free_bytes is None else round(self.device_free_bytes / gib, 2),
                "reserve_gib": round(self.reserve_bytes / gib, 3)}


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_free_bytes(device: str) -> int:
    """Free GPU memory for this process: what the driver reports, within any cap set with
    torch.cuda.set_per_process_memory_fraction."""
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(dev)
    frac = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(dev)
    used, cached = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
    return int(min(free + cached - used, frac * total - used))


def plan_memory(n_samples: int, seq_len: int, hidden: int, dtype: torch.dtype, layer: torch.nn.Module,
                max_in: int, device: str) -> MemoryPlan:
    """Where the calibration activations live: n × seq × hidden × bytes (each batch's output
    replaces its input once the layer is solved) plus one batch in flight."""
    act = n_samples * seq_len * hidden * torch.finfo(dtype).bits // 8
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    # layer + two Hessians of the widest input + the solver's float32 copies, with headroom
    reserve = int(1.5 * (layer_bytes + 3 * max_in * max_in * 4)) + (512 << 20)
    host = _host_available()
    if device.startswith("cuda"):
        free = device_free_bytes(device)
        if free < reserve:
            raise UserError(f"{device} has {free / 2**30:.1f} GiB free for this process; one decoder layer, its "
                            f"statistics and the solver need about {reserve / 2**30:.1f} GiB")
        on = device if act + reserve <= free else "cpu"
    else:
        free, on = None, "cpu"
    if on == "cpu" and host is not None and act > 0.9 * host:
        raise UserError(f"calibration activations need {act / 2**30:.1f} GiB ({n_samples} samples × {seq_len} tokens "
                        f"× hidden {hidden}) but only {host / 2**30:.1f} GiB of host memory is available; "
                        "lower n_samples or seq_len")
    return MemoryPlan(act, on, free, reserve)
