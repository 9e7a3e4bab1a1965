"""The lens interface: every read-out is ``unembedding.logits(lens.transform(h, layer))``.

In the spirit of tuned-lens's ``Lens``: a lens maps layer ℓ's residual ``[rows, d_model]`` (ℓ = 0
the embeddings, ℓ = i+1 after block i) to what the unembedding reads; the unembedding
(``lens.unembed.Unembedding``) applies no norm, so the norm belongs to the lens. ``NormLens`` is
the logit lens under a norm strategy; ``lens.tuned.TunedLens`` translates, then applies the final
norm. Any object with ``name`` and ``transform`` is a lens; optional members: ``bind(model)``
(returns the lens ready for that model), ``per_layer()`` (the JSON's norm description) and
``warnings``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from layers_core.lens.views import NORM_VIEWS
from layers_core.norm_utils import apply_norm_or_skip, classify_norm, get_correct_norm_module, norm_module_label


@runtime_checkable
class Lens(Protocol):
    """Maps layer ``layer``'s residual ``[rows, d_model]`` to the unembedding's input."""

    name: str

    def transform(self, residual: Tensor, layer: int) -> Tensor:
        """``[rows, d_model]`` → ``[rows, d_model]``, same dtype and device."""
        ...


def lens_norm_plan(model: nn.Module, strategy: str) -> list[tuple[nn.Module | None, str | None]]:
    """(norm module, label) for every lens layer 0..n under a norm strategy (``final``, ``arch``,
    ``none``): layer 0 is before block 0, layer ℓ after block ℓ−1.

    ``arch`` where the block it names has no such norm (a layout without pre-sublayer norms,
    OLMo-2/OLMo-3: the residual stream meets no norm before the final one) applies ``ln_final``:
    under ``arch`` every layer is decoded through a norm, never silently through none.
    """
    if strategy not in NORM_VIEWS:
        raise ValueError(f"unknown norm strategy {strategy!r}; expected one of {NORM_VIEWS}")
    probes = [(0, False)] + [(block, True) for block in range(len(model.blocks))]
    plan = [(get_correct_norm_module(model, i, after, strategy), norm_module_label(model, i, after, strategy))
            for i, after in probes]
    if strategy == "arch":
        final = getattr(model, "ln_final", None)
        plan = [(module, label) if module is not None else (final, None if final is None else "ln_final")
                for module, label in plan]
    return plan


def describe_plan(plan: list[tuple[Any, str | None]]) -> list[dict]:
    """``[{layer, norm, kind}]`` for the JSON: which norm decodes each layer, with what maths."""
    return [{"layer": layer, "norm": label, "kind": None if module is None else classify_norm(module)}
            for layer, (module, label) in enumerate(plan)]


def plan_warnings(plan: list[tuple[Any, str | None]]) -> list[str]:
    """One warning per planned norm of an unknown kind (it is skipped, never given wrong maths)."""
    return [f"unknown norm type {type(module).__name__} at {label or '?'}: normalisation skipped"
            for module, label in plan if module is not None and classify_norm(module) == "unknown"]


class NormLens:
    """The logit lens: layer ℓ's residual through the norm that ``strategy`` plans for it."""

    def __init__(self, model: nn.Module, strategy: str = "final"):
        self.name = strategy
        self.plan = lens_norm_plan(model, strategy)

    def transform(self, residual: Tensor, layer: int) -> Tensor:
        module, label = self.plan[layer]
        return apply_norm_or_skip(residual, module, None, label)

    def per_layer(self) -> list[dict]:
        return describe_plan(self.plan)

    @property
    def warnings(self) -> list[str]:
        return plan_warnings(self.plan)

    def __repr__(self) -> str:
        return f"NormLens({self.name!r}, {len(self.plan)} layers)"


def lens_description(lens: Lens, n_layers: int) -> list[dict]:
    """The JSON's ``norm_strategy.per_layer`` for any lens (a user lens without ``per_layer``
    gets ``norm: null`` rows)."""
    describe = getattr(lens, "per_layer", None)
    if describe is not None:
        return describe()
    return [{"layer": layer, "norm": None, "kind": None} for layer in range(n_layers + 1)]
