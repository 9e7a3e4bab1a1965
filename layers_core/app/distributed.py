"""After a ``--shard auto`` run under torchrun: every rank meets at a ``torch.distributed``
barrier (gloo, so CPU-only jobs work too) and rank 0 merges the shards into ``--out_dir`` with
the same code as ``merge.py``."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

from layers_core.app.cli import EXIT_FAILED, EXIT_OK

BARRIER_TIMEOUT = timedelta(hours=2)  # the slowest shard's remaining work, at most


def merge_after_barrier(code: int, spec: Any, out_dir: str, plots: bool = True, quiet: bool = False) -> int:
    """Waits for every rank; rank 0 merges when all of them succeeded. Returns this rank's exit code."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)  # env:// from torchrun
    try:
        failures = torch.tensor([int(code != EXIT_OK)])
        dist.all_reduce(failures)  # also the barrier: every rank has finished its shard
        if spec.k != 0:
            return code
        if int(failures):
            print(f"❌ merge skipped: {int(failures)} of {spec.n} shards failed; their folders are in {out_dir}",
                  file=sys.stderr)
            return EXIT_FAILED
        from layers_core.results.merge import MergeError, merge

        try:
            merged = merge([out_dir], out_dir, plots=plots)
        except (MergeError, OSError, ValueError, KeyError) as error:
            print(f"❌ merge failed: {error}", file=sys.stderr)
            return EXIT_FAILED
        if not quiet:
            for name, document in merged.items():
                count = document["prompt_set"]["count"]
                print(f"✅ {name}: {spec.n} shards merged into {out_dir} ({count} prompts)")
        return code
    finally:
        dist.destroy_process_group()
