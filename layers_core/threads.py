"""CPU threads for torch: as many as there are idle cores.

torch's OpenMP threads spin while they wait for each other; when another process holds one of the
cores, every parallel region waits for a thread that is not running, and a run on a 2-core machine
slowed from 4.6 s to 13.8 s (forward 0.8 → 11.8 s). Fewer threads than cores cost little when the
machine is idle, so the rule is: measure how much CPU *other* processes used during an interval
we spend anyway (importing torch), and give torch only the cores left. Our own live children (the
picture processes warming up meanwhile) count as ours, not as others. Linux only (``/proc/stat``);
elsewhere nothing changes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

BUSY_CORE_FRACTION = 0.5  # another process using ≥ half a core counts as holding it
_PROC_STAT = "/proc/stat"


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU seconds of the whole machine and of this process (its children included), at one
    moment."""

    machine_busy_s: float
    own_busy_s: float
    wall_s: float


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def snapshot() -> CpuSnapshot | None:
    """Reads the machine's and this process's CPU time; None where ``/proc/stat`` is missing."""
    try:
        with open(_PROC_STAT, encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy_ticks = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system + _live_children_busy_s()
    return CpuSnapshot(busy_ticks / _clock_ticks(), own, time.monotonic())


def _live_children_busy_s() -> float:
    """CPU seconds of this process's children that are still running (``os.times`` counts only
    those already waited for); 0 where ``/proc`` does not list children."""
    ticks = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as handle:
                pids = handle.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime and stime (fields 14 and 15 of stat(5))
    return ticks / _clock_ticks()


def busy_cores_of_others(start: CpuSnapshot | None, end: CpuSnapshot | None) -> float:
    """Cores other processes kept busy between two snapshots (0 if unknown)."""
    if start is None or end is None or end.wall_s - start.wall_s < 0.2:
        return 0.0
    others = (end.machine_busy_s - start.machine_busy_s) - (end.own_busy_s - start.own_busy_s)
    return max(0.0, others / (end.wall_s - start.wall_s))


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_for(busy_others: float, cores: int, default_threads: int) -> int:
    """``default_threads`` on an idle machine, else one per core the others leave free (≥ 1)."""
    held = int(busy_others + (1 - BUSY_CORE_FRACTION))  # rounds at the busy fraction
    if held <= 0:
        return default_threads
    return max(1, min(default_threads, cores - held))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Runs the block with ``count`` torch threads (None: unchanged), then restores the old count."""
    import torch

    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


MIN_INTERVAL_S = 0.2  # shorter intervals say too little about other processes


class IdleCoreRule:
    """The idle-core rule for a long-lived session (a notebook): before each piece of work, the
    cores other processes kept busy since the previous piece began are given back. The first
    interval starts when the model starts loading; an interval under ``MIN_INTERVAL_S`` keeps
    the previous choice (at first torch's own count)."""

    def __init__(self, start: CpuSnapshot | None = None):
        self._mark = start or snapshot()
        self._count: int | None = None

    def choose(self) -> int | None:
        """The thread count for the next piece of work (None: torch's own)."""
        import torch

        now = snapshot()
        if self._mark is not None and now is not None and now.wall_s - self._mark.wall_s >= MIN_INTERVAL_S:
            busy = busy_cores_of_others(self._mark, now)
            self._count = threads_for(busy, available_cores(), torch.get_num_threads())
            self._mark = now
        return self._count
