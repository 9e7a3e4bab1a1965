"""Residual-stream hooks: layer 0 = ``blocks.0.hook_resid_pre``, layer ℓ = ``blocks.{ℓ-1}.hook_resid_post``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

RESID_PRE_0 = "blocks.0.hook_resid_pre"
RESID_POST = "blocks.{}.hook_resid_post"
RESID_MID = "blocks.{}.hook_resid_mid"  # after a block's attention, before its MLP
STANDARD_POSITIONS = "standard"


def residual_hook_names(n_layers: int) -> list[str]:
    """The n+1 hook names of the lens, in layer order 0..n."""
    return [RESID_PRE_0] + [RESID_POST.format(i) for i in range(n_layers)]


def mid_hook_names(n_layers: int) -> list[str]:
    """``blocks.{i}.hook_resid_mid`` for every block (``--sublayers``): block i's residual after
    its attention and before its MLP."""
    return [RESID_MID.format(i) for i in range(n_layers)]


def build_cache_hook(cache: MutableMapping[str, Any], key: str, device: Any = None) -> Callable:
    """A forward hook storing ``tensor.detach()`` (same dtype) under ``key``.

    The key is fixed here, never taken from ``hook.name``: the Bridge reports canonical aliases
    there (e.g. ``blocks.1.hook_out``). With ``device`` the tensor is moved there as it is
    captured (the lens device of a model split over several GPUs); without, it stays where it is.
    """

    def cache_hook(tensor, hook=None):
        captured = tensor.detach()
        cache[key] = captured if device is None else captured.to(device, non_blocking=True)
        return None

    return cache_hook


@dataclass
class ResidualHookHandle:
    """One attached hook; ``remove`` is idempotent."""

    point: Any
    lens_handle: Any
    removed: bool = field(default=False)

    def remove(self) -> None:
        """Unregisters the hook from the torch module and from the hook point's bookkeeping."""
        if self.removed:
            return
        self.lens_handle.hook.remove()
        registered = getattr(self.point, "fwd_hooks", None)
        if isinstance(registered, list) and self.lens_handle in registered:
            registered.remove(self.lens_handle)
        self.removed = True


def attach_hooks(model: Any, cache: MutableMapping[str, Any], names: Sequence[str],
                 device: Any = None) -> list[ResidualHookHandle]:
    """Attaches one caching hook per name in ``names`` (each stores under its own name); every
    name must be a hook point of ``model``. On failure nothing stays attached."""
    hook_points = model.hook_dict
    missing = [name for name in names if name not in hook_points]
    if missing:
        raise ValueError(f"model has no hook point(s) {missing[:3]}; cannot cache the residual")
    handles: list[ResidualHookHandle] = []
    try:
        for name in names:
            point = hook_points[name]
            handles.append(ResidualHookHandle(point, point.add_hook(build_cache_hook(cache, name, device))))
    except BaseException:
        detach_hooks(handles)
        raise
    return handles


def attach_residual_hooks(
    model: Any, cache: MutableMapping[str, Any], device: Any = None, mid: bool = False
) -> tuple[list[ResidualHookHandle], bool]:
    """Attaches exactly the n+1 residual hooks (and the n mid-block ones with ``mid``); returns
    (handles, has_pos_embed).

    ``has_pos_embed`` is True when the model adds learned/sinusoidal positions to the embedding
    (``cfg.positional_embedding_type == "standard"``), so layer 0 includes positional information.
    """
    names = residual_hook_names(int(model.cfg.n_layers))
    if mid:
        names += mid_hook_names(int(model.cfg.n_layers))
    handles = attach_hooks(model, cache, names, device)
    has_pos_embed = getattr(model.cfg, "positional_embedding_type", None) == STANDARD_POSITIONS
    return handles, has_pos_embed


def detach_hooks(handles: list[ResidualHookHandle]) -> None:
    """Removes every handle; safe to call twice."""
    for handle in handles:
        handle.remove()


@contextmanager
def activation_cache(model: Any, names: Sequence[str], device: Any = None) -> Iterator[dict[str, Any]]:
    """Context manager: ``with activation_cache(model, names) as cache: model(tokens)`` leaves each
    named hook point's output in ``cache[name]`` (moved to ``device`` as captured). The hooks are
    removed on exit, also after an exception. The one hook mechanism of the library."""
    cache: dict[str, Any] = {}
    handles = attach_hooks(model, cache, names, device)
    try:
        yield cache
    finally:
        detach_hooks(handles)


@contextmanager
def residual_cache(model: Any, device: Any = None, mid: bool = False) -> Iterator[tuple[dict[str, Any], bool]]:
    """Context manager: ``with residual_cache(model) as (cache, has_pos_embed): model(tokens)``.

    Residuals are moved to ``device`` as they are captured (None: left where they are). The hooks
    are removed on exit, also after an exception.
    """
    cache: dict[str, Any] = {}
    handles, has_pos_embed = attach_residual_hooks(model, cache, device, mid)
    try:
        yield cache, has_pos_embed
    finally:
        detach_hooks(handles)
