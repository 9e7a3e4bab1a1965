"""How much memory a run needs, estimated from the checkpoint before any weight is read.

weights (the checkpoint's files, rescaled from the declared to the compute dtype) + the float32
``W_U`` the lens decodes through when the model computes in half precision + the lens's working
buffers. Compared with what the devices have free, so that a model that fits nowhere fails in a
second with one line instead of after minutes of loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from layers_core.lens.stats import DEFAULT_BUDGET_BYTES

GIB = 2**30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
USABLE_FRACTION = 0.95  # of the free memory; the rest is left for activations and the allocator


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of a run: weights, the float32 unembedding copy, lens buffers."""

    weights_bytes: int
    unembed_bytes: int
    lens_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.unembed_bytes + self.lens_bytes

    def describe(self) -> str:
        """``≈ 17.4 GiB (weights 15.0 + float32 W_U 1.96 + lens 0.50)``."""
        return (f"≈ {self.total_bytes / GIB:.1f} GiB (weights {self.weights_bytes / GIB:.2f} + "
                f"float32 W_U {self.unembed_bytes / GIB:.2f} + lens {self.lens_bytes / GIB:.2f})")


def checkpoint_weight_bytes(directory: str) -> int | None:
    """Bytes of the weight files in a local model directory (safetensors preferred), or None."""
    if not os.path.isdir(directory):
        return None
    names = os.listdir(directory)
    for suffix in WEIGHT_SUFFIXES:
        files = [n for n in names if n.endswith(suffix)]
        if files:
            return sum(os.path.getsize(os.path.join(directory, n)) for n in files)
    return None


def _dims(config: Any) -> tuple[int, int]:
    text = getattr(config, "text_config", None) or config
    d_model = next(getattr(text, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(text, k, None))
    return int(d_model), int(text.vocab_size)


def estimate(config: Any, weight_file_bytes: int, declared: torch.dtype | None,
             compute: torch.dtype, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Footprint:
    """The footprint of running ``config``'s model in ``compute`` from ``weight_file_bytes`` of
    checkpoint stored in ``declared`` (None: float32)."""
    stored = (declared or torch.float32).itemsize
    weights = weight_file_bytes * compute.itemsize // stored
    d_model, vocab = _dims(config)
    unembed = 0 if compute == torch.float32 else d_model * vocab * 4
    return Footprint(weights, unembed, 2 * budget_bytes)


def available_bytes(device: str, max_memory: dict | None = None) -> int | None:
    """Free memory for the model on ``device`` (all visible GPUs for cuda, or the
    ``max_memory`` budget), or None where it cannot be read."""
    if device == "cuda":
        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return free if not max_memory else min(free, sum(_bytes(v) for v in max_memory.values()))
    if device == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6,
          "GB": 10**9, "TB": 10**12, "B": 1}


def _bytes(value: int | str) -> int:
    """``"70GiB"``, ``"80GB"`` or a number of bytes → bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().upper()
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def fits(footprint: Footprint, available: int | None) -> bool:
    """Whether the run fits in ``available`` bytes (unknown availability: assume it does)."""
    return available is None or footprint.total_bytes <= USABLE_FRACTION * available
