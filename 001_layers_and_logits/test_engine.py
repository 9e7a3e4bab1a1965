"""One engine: ``pipeline.capture`` is the only code that runs the model, over the one hook
mechanism of ``hooks``; ``results/`` turns plain data into files and never imports anything that
runs the model."""

import ast
import os
import re

import pytest
import torch

from layers_core.hooks import residual_hook_names
from layers_core.pipeline.capture import ALL_POSITIONS, capture

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(os.path.dirname(HERE), "layers_core")
MODEL_NAMES = {"model", "bridge", "lm", "hf_model"}  # what the library calls a loaded model
RUNNERS = {"run_with_cache", "hooks", "add_hook", "generate", "activation_cache", "residual_cache",
           "attach_hooks", "attach_residual_hooks"}
ALLOWED = {"pipeline/capture.py": {"model", "activation_cache", "generate"},  # the engine
           "hooks.py": {"add_hook", "attach_hooks", "attach_residual_hooks"}}  # the one hook mechanism
RUNS_THE_MODEL = {"layers_core.pipeline.capture", "layers_core.hooks"}


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, PACKAGE).replace(os.sep, "/")] = path
    return found


def _model_calls(tree: ast.AST) -> set[str]:
    """Names of the calls in ``tree`` that run a model or attach hooks to one."""
    calls = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in MODEL_NAMES | RUNNERS:
            calls.add(func.id)
        elif isinstance(func, ast.Attribute) and (func.attr in RUNNERS or func.attr == "bridge"):
            calls.add(func.attr)
        elif isinstance(func, ast.Attribute) and func.attr == "fit":
            owner = getattr(func.value, "id", "")
            if owner == "JacobianLens":
                calls.add("JacobianLens.fit")
    return calls


def test_only_the_capture_primitive_runs_the_model():
    offenders = {}
    for relative, path in _modules().items():
        with open(path, encoding="utf-8") as handle:
            calls = _model_calls(ast.parse(handle.read()))
        calls -= ALLOWED.get(relative, set())
        if relative.startswith("pipeline/"):
            calls.discard("JacobianLens.fit")  # TransformerLens's own estimator, called from the engine
        if calls:
            offenders[relative] = sorted(calls)
    assert offenders == {}
    assert len(_modules()) > 40


def test_the_call_scan_sees_a_forward_and_a_hook_context():
    """The scan above would catch the forward paths the engine replaced."""
    code = ("def f(model, bridge, lens_model, tokens):\n"
            "    with residual_cache(bridge) as cache:\n        bridge(tokens)\n"
            "    lens_model.bridge(tokens)\n    model.run_with_cache(tokens)\n    model(tokens)\n")
    assert _model_calls(ast.parse(code)) == {"residual_cache", "bridge", "run_with_cache", "model"}


def _runtime_imports(path: str) -> set[str]:
    """The layers_core modules a file imports when it runs (``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    skipped = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for child in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in names if name.startswith("layers_core")}


def test_results_imports_nothing_that_runs_the_model():
    modules = {"layers_core." + re.sub(r"(/__init__)?\.py$", "", rel).replace("/", "."): path
               for rel, path in _modules().items()}
    graph = {name: {d for d in _runtime_imports(path) if d in modules} for name, path in modules.items()}

    def closure(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()] - seen:
                seen.add(nxt)
                stack.append(nxt)
        return seen

    results = [name for name in modules if name.startswith("layers_core.results.")]
    assert len(results) > 10
    reaching = {name: sorted(closure(name) & RUNS_THE_MODEL) for name in results}
    assert {name: found for name, found in reaching.items() if found} == {}
    assert closure("layers_core.pipeline.analysis") & RUNS_THE_MODEL  # the check sees the engine


@pytest.mark.parametrize("keep", [1, 3, ALL_POSITIONS])
def test_capture_returns_the_models_logits_and_the_hooked_residuals(load_bridge, keep):
    """Against a plain forward and TransformerLens's own cache; the hooks are gone afterwards."""
    model = load_bridge("llama")
    tokens = model.to_tokens("The capital of France is")
    names = residual_hook_names(int(model.cfg.n_layers))
    captured = capture(model, tokens, names, logits_to_keep=keep)
    with torch.inference_mode():
        plain = model(tokens)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    expected = plain if keep is ALL_POSITIONS else plain[:, -keep:]
    assert captured.logits.shape == expected.shape
    torch.testing.assert_close(captured.logits, expected, rtol=0, atol=1e-5)
    assert list(captured.activations) == names
    for name in names:
        torch.testing.assert_close(captured.activations[name], cache[name], rtol=0, atol=1e-6)
    assert all(not point.fwd_hooks for point in model.hook_dict.values())


def test_capture_removes_its_hooks_when_the_forward_raises(load_bridge):
    model = load_bridge("llama")
    with pytest.raises(Exception):
        capture(model, torch.tensor([[10**9]]), residual_hook_names(int(model.cfg.n_layers)))
    assert all(not point.fwd_hooks for point in model.hook_dict.values())


def test_capture_refuses_a_hook_point_the_model_lacks(load_bridge):
    with pytest.raises(ValueError, match="no hook point"):
        capture(load_bridge("llama"), torch.tensor([[1, 2]]), ["blocks.99.hook_resid_post"])


MAX_PARAMETERS = 7


def test_no_public_call_takes_more_than_seven_parameters():
    """Settings live on one object (``SweepSettings``, ``CopyRule``, ``RunFacts``, ``SetPlan``), not
    in ever longer signatures; ``self``/``cls`` do not count, ``*args``/``**kwargs`` do."""
    too_long = {}
    for relative, path in _modules().items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                args = node.args
                named = args.posonlyargs + args.args + args.kwonlyargs
                names = [a.arg for a in named if a.arg not in ("self", "cls")]
                count = len(names) + bool(args.vararg) + bool(args.kwarg)
                if count > MAX_PARAMETERS:
                    too_long[f"{relative}:{node.name}"] = count
    assert too_long == {}
