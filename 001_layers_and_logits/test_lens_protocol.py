"""The Lens interface: every lens goes through the same protocol and the same decode path, so a
read-out is ``unembedding.logits(lens.transform(h, layer))`` whatever the lens is."""

import ast
import math
import os
import re

import pandas as pd
import pytest
import torch

import layers_core as lc
from conftest import HERE
from layers_core.lens.tuned import TunedLens
from layers_core.pipeline.sweep import forward_with_residuals

ROOT = os.path.dirname(HERE)
PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"


class IdentityLens:
    """A user lens that reads the raw residual."""

    name = "identity"

    def transform(self, residual, layer):
        return residual


def _lenses(model):
    d, n = int(model.cfg.d_model), int(model.cfg.n_layers)
    torch.manual_seed(0)
    tuned = TunedLens(0.01 * torch.randn(n, d, d), 0.01 * torch.randn(n, d)).bind(model)
    return [lc.NormLens(model, "final"), lc.NormLens(model, "arch"), lc.NormLens(model, "none"), tuned,
            IdentityLens()]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_every_lens_is_decoded_as_unembedding_of_its_transform(load_bridge, family):
    """Independent of the sweep: hooked residuals → lens.transform → W_U (+ b_U) → head transform,
    in float64, against the pure rows of ``lc.sweep(lens=...)``."""
    model = load_bridge(family)
    lens_model = lc.load(model)
    W_U, b_U = model.unembed.W_U.detach().double(), model.unembed.b_U.detach().double()
    with torch.inference_mode():
        _, residuals = forward_with_residuals(model, model.to_tokens(PROMPT))
    for lens in _lenses(model):
        assert isinstance(lens, lc.Lens)
        pure = lc.sweep(lens_model, PROMPT, "Berlin", lens=lens, control=False).pure
        for layer, resid in enumerate(residuals):
            before = resid.clone()
            out = lens.transform(resid[-1:], layer)
            assert torch.equal(resid, before) and out.shape == resid[-1:].shape and out.dtype == resid.dtype
            logits = lens_model.unembed.transform(out.double() @ W_U + b_U)
            log_probs = torch.log_softmax(logits, -1)[0]
            entropy = float(-(log_probs.exp() * log_probs).nan_to_num().sum() / math.log(2))
            row = pure.iloc[layer]
            assert row["entropy"] == pytest.approx(entropy, abs=1e-4), (lens.name, layer)
            assert row["prob1"] == pytest.approx(float(log_probs.max().exp()), abs=1e-5), (lens.name, layer)


def test_a_user_lens_returning_its_input_equals_norm_none_row_for_row(load_bridge):
    lens_model = lc.load(load_bridge("llama"))
    mine = lc.sweep(lens_model, lc.DEFAULT_PROMPT, "Berlin", lens=IdentityLens())
    none = lc.sweep(lens_model, lc.DEFAULT_PROMPT, "Berlin", settings=lc.SweepSettings(norm_strategy="none"))
    pd.testing.assert_frame_equal(mine.pure, none.pure)
    pd.testing.assert_frame_equal(mine.records, none.records)
    assert mine.diagnostics["norm_strategy"]["name"] == "identity"


def test_an_object_without_transform_is_refused(load_bridge):
    with pytest.raises(TypeError, match="is not a Lens"):
        lc.sweep(lc.load(load_bridge("llama")), PROMPT, "Berlin", lens=object())


def test_the_view_registry_names_every_cli_choice():
    from layers_core.app.cli import build_parser
    from layers_core.lens.views import LENS_CHOICES, NORM_VIEWS, VIEWS

    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["norm_strategy"].choices) == NORM_VIEWS and tuple(actions["lens"].choices) == LENS_CHOICES
    for view in VIEWS.values():
        assert view.partner is None or view.partner in NORM_VIEWS
        assert (view.loader is None) == (view.name in NORM_VIEWS)


def _layers_core_imports(path):
    """Every layers_core module a file imports: top level, inside functions, under TYPE_CHECKING."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("layers_core")}
        elif (isinstance(node, ast.ImportFrom) and node.level == 0
              and (node.module or "").startswith("layers_core")):
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_layers_core_has_no_import_cycle():
    """No module imports one that imports it back, directly or through others, lazily or not."""
    package = os.path.join(ROOT, "layers_core")
    modules = {}
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                dotted = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                modules[re.sub(r"\.__init__$", "", dotted)] = os.path.join(folder, name)
    graph = {m: {d for d in _layers_core_imports(p) if d in modules and d != m} for m, p in modules.items()}
    assert len(graph) > 30 and graph["layers_core.app.main"]  # the walk found the package
    cycles = []
    for start in graph:  # a path from a module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert cycles == []
