"""Python's cyclic garbage collector around a run's start-up, for the command line only.

Importing torch, transformers and TransformerLens and building the model creates millions of
objects that live until exit, none of them garbage; each full collection on the way walks all
of them (8 of them cost ≈ 1 s of a 6 s run on the bundled model). The entry points pause the
collector before importing anything heavy; once the model is loaded the runner freezes what
exists (later collections skip it) and resumes collecting, so a long prompt set still frees its
cycles. In-process callers (tests, notebooks) never pause it, and nothing here changes for them.
"""

from __future__ import annotations

import gc


def pause() -> None:
    """Stops automatic collections (the entry points, before torch is imported)."""
    gc.disable()


def resume_after_load() -> None:
    """If the collector was paused: freezes every object alive now (the libraries and the loaded
    model) and resumes automatic collections. A no-op where it was never paused."""
    if gc.isenabled():
        return
    gc.freeze()
    gc.enable()
