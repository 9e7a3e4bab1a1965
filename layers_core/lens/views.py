"""The registry of lens views: one row per view, torch-free (the CLI, run_dir, the report and the
pictures read it; adding a lens is one class plus one row here).

A *view* is what decoded a table: a norm strategy of the logit lens (``final``, ``arch``,
``none``) or a fitted lens (``tuned``, ``jacobian``). Each row names its comparison partner (the lens written
beside it; None = the logit lens under ``--norm``), the legacy ``layer0_norm_fix`` label, and for
fitted lenses the ``module:function`` that loads one for a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

LOGIT = "logit"  # --lens logit: the logit lens under --norm


@dataclass(frozen=True)
class View:
    """One lens view: its name (JSON ``norm_strategy.name``, file suffix, picture label)."""

    name: str
    partner: str | None  # the comparison view; None = the logit lens under --norm
    layer0_norm_fix: str  # diagnostics.layer0_norm_fix (a legacy label)
    description: str
    loader: str | None = None  # "module:function(path, lm) -> Lens" for fitted lenses
    files: tuple[str, ...] = ()  # what a lens path of this view holds (checked before loading)
    default_dir: str | None = None  # "module:function(clean_name) -> dir": where it lives by default
    single_file: bool = False  # the lens path is one file (or a directory holding exactly one)

    @property
    def label(self) -> str:
        """How pictures and console lines name it, e.g. ``final lens``."""
        return f"{self.name} lens"

    @property
    def file_suffix(self) -> str:
        """``output-<name>-pure-next-token-<suffix>.csv`` when this view is the comparison."""
        return self.name


VIEWS: dict[str, View] = {view.name: view for view in (
    View("final", "arch", "using_ln_final_on_embeddings",
         "ln_final at every layer: the standard logit lens"),
    View("arch", "final", "using_real_ln1_on_embeddings",
         "the norm the model applies next (the seed's rule)"),
    View("none", "final", "no_normalization", "the raw residual, no norm"),
    View("tuned", None, "using_tuned_translator_then_ln_final",
         "an affine translator per layer, then ln_final (fit_lens.py)",
         loader="layers_core.lens.tuned:load_for_model", files=("config.json", "params.pt"),
         default_dir="layers_core.lens.tuned:default_lens_dir"),
    View("jacobian", None, "using_jacobian_transport_then_ln_final",
         "a d×d Jacobian transport per block (TransformerLens's JacobianLens), then ln_final",
         loader="layers_core.lens.jacobian:load_for_model",
         default_dir="layers_core.lens.jacobian:default_lens_dir", single_file=True),
)}
NORM_VIEWS = tuple(name for name, view in VIEWS.items() if view.loader is None)  # --norm choices
FITTED_VIEWS = tuple(name for name, view in VIEWS.items() if view.loader is not None)
LENS_CHOICES = (LOGIT, *FITTED_VIEWS)  # --lens choices


def view(name: str) -> View:
    """The registry row of ``name``; a user lens not in the registry gets a row of its own
    (compared with the logit lens under ``--norm``)."""
    return VIEWS.get(name) or View(name, None, "user_lens", "a user lens")


def single_file_in(path: str, suffix: str = ".pt") -> str | None:
    """``path`` itself if it is a file, else the one ``*suffix`` file in the directory ``path``
    (None for none or several): where a single-file lens lives (torch-free: the CLI checks it
    before loading)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        return None
    found = [name for name in os.listdir(path) if name.endswith(suffix)]
    return os.path.join(path, found[0]) if len(found) == 1 else None


def resolve_entry(spec: str):
    """The object a ``module:function`` registry entry names (imported on first use)."""
    import importlib

    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def comparison_of(chosen: str, norm_strategy: str) -> str:
    """The view written beside ``chosen``: its partner, or the logit lens under ``--norm``."""
    partner = view(chosen).partner
    return norm_strategy if partner is None else partner
