"""The documentation: the site builds with ``mkdocs build --strict``, every Python block in the
README and in docs/ runs as written, every signature shown is the code's, and the facts the
prose quotes are the ones a run gives."""

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import layers_core as lc
from layers_core.app import cli
from layers_core.model.lens_model import LensModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(name for name in os.listdir(DOCS) if name.endswith(".md"))
RUN_LATEST = "001_layers_and_logits/run-latest/"
BUNDLED = "output-SmolLM2-135M-Instruct"


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _all_docs() -> dict[str, str]:
    texts = {f"docs/{name}": _text(os.path.join(DOCS, name)) for name in PAGES}
    texts["README.md"] = _text(os.path.join(ROOT, "README.md"))
    return texts


def _python_blocks(text: str) -> list[str]:
    """Every fenced Python block, also those indented inside a list item (dedented)."""
    return [textwrap.dedent(block) for indent, block in
            re.findall(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)]


def run_blocks(relative: str) -> dict:
    """Executes every Python block of one page, in order, in one namespace (as a reader would in
    one notebook); file paths into ``run-latest/`` read the current directory instead, and paths
    into the repository's ``facts/`` read the repository's."""
    namespace: dict = {}
    facts = "001_layers_and_logits/facts/"
    for block in _python_blocks(_text(os.path.join(ROOT, relative))):
        block = block.replace(RUN_LATEST, "").replace(f'"{facts}', f'"{os.path.join(HERE, "facts")}/')
        exec(compile(block, relative, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return str(out)


def test_the_site_builds_strict_with_every_flag_and_the_api_reference(site):
    page = _text(os.path.join(site, "cli", "index.html"))
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in page, flag
    assert "32768" in page
    assert all(f'id="{name}"' in page for name in ("run", "fit", "merge", "evaluate", "self-test"))
    assert "output-&lt;name&gt;-lenses.csv" in page  # a help's <name> is text, not an HTML tag
    reference = _text(os.path.join(site, "api", "index.html"))
    for name in ("sweep_set", "LensModel", "TokenDecoder", "keep_residuals"):
        assert name in reference, name
    assert "schema_version" in _text(os.path.join(site, "changelog", "index.html"))


def test_every_page_with_python_is_run_by_a_test():
    with_code = {name for name, text in _all_docs().items() if _python_blocks(text)}
    assert with_code == {"README.md", "docs/index.md", "docs/api.md", "docs/lenses.md", "docs/outputs.md",
                         "docs/latent-language.md"}


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_the_first_example_runs_as_written(bundled_model_dir, page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = run_blocks(page)["s"]
    last = s.pure.iloc[-1]
    assert last["top1"] == " Paris" and last["answer_rank"] == 1
    assert last["p_answer"] == pytest.approx(0.749, abs=0.01) and last["kl_to_final_bits"] < 1e-6


def test_the_notebook_page_runs_as_written(bundled_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks("docs/api.md")
    assert isinstance(namespace["s"], lc.Sweep) and namespace["s"].pure.iloc[-1]["top1"] == " Berlin"
    assert namespace["facts"].summary["prompt_id"].tolist() == ["de", "fr"]
    tracked = namespace["arch"].tracked
    assert set(tracked["token"]) == {" Paris"} and namespace["arch"].diagnostics["norm_strategy"]["name"] == "arch"
    assert (tmp_path / "my-run" / f"{BUNDLED}.json").exists()


def test_the_published_analysis_reproduces_as_the_page_says(gemma3_model_dir, tmp_path, monkeypatch):
    """docs/latent-language.md: the latent-language curves on Gemma-3-270M in 15 lines; the
    table it quotes is the run's, and so are its counts."""
    monkeypatch.chdir(tmp_path)
    page = _text(os.path.join(DOCS, "latent-language.md"))
    code = _python_blocks(page)
    assert len(code) == 1 and len([line for line in code[0].splitlines() if line.strip()]) <= 16
    namespace = run_blocks("docs/latent-language.md")
    s, curves = namespace["s"], namespace["curves"]
    means = curves.pivot(index="layer", columns="column", values="mean")
    quoted = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", page, re.M)
    assert [int(row[0]) for row in quoted] == list(range(10, 19))
    for layer, *values in quoted:
        assert [round(means.loc[int(layer), c], 3) for c in ("de", "en", "fr")] == \
            pytest.approx([float(v) for v in values], abs=0.002), layer
    assert (means.loc[:9] < 1e-3).all().all()  # "layers 0–9 are below 0.001"
    assert len(s.outcomes) == 42 and set(curves.n) == {42}
    right = sum(o.pure[-1]["answer_rank"] == 1 for o in s.outcomes)
    assert f"for only {right} of the 42 nouns" in page
    assert means.loc[13:15, "en"].gt(means.loc[13:15, "de"]).all()  # English first in the middle-late layers
    assert means.loc[16:, "de"].gt(means.loc[16:, "en"]).all()  # then German
    assert (tmp_path / "latent-language.png").stat().st_size > 10_000


def test_your_own_lens_runs_as_written(bundled_model_dir):
    namespace = run_blocks("docs/lenses.md")
    mine, final = namespace["s"], lc.sweep(namespace["lm"], lc.DEFAULT_PROMPT, "Berlin")
    # RMSNorm is scale-invariant: unit-RMS first, then ln_final, reads what ln_final reads
    assert (mine.pure["top1"] == final.pure["top1"]).all()
    assert (mine.pure["entropy"] - final.pure["entropy"]).abs().max() < 1e-3


def test_the_pandas_recipe_runs_as_written(bundled_cli_run, monkeypatch):
    monkeypatch.chdir(bundled_cli_run)
    namespace = run_blocks("docs/outputs.md")
    records = namespace["records"]
    assert records["prob20"].dtype == "float64" and records["token"].map(type).eq(str).all()
    assert namespace["pure"]["answer_rank"].iloc[-1] == 1


def _shown_signatures() -> list[tuple[str, str, str]]:
    """(page, dotted name, parameter list) of every ``lc.f(...)`` code span followed by →."""
    found = []
    for page, text in _all_docs().items():
        for match in re.finditer(r"`(lc\.[\w.]+)\(([^`]*)\)`\s*→", text):
            found.append((page, match.group(1), match.group(2)))
    return found


def _resolve(dotted: str):
    value = lc
    for part in dotted.split(".")[1:]:
        value = getattr(value, part)
    return value


def test_every_signature_shown_is_the_codes():
    shown = _shown_signatures()
    assert {name for _, name, _ in shown} >= {"lc.load", "lc.sweep", "lc.sweep_set"}
    for page, name, params in shown:
        written = ast.parse(f"def f({params}): pass").body[0].args
        actual = inspect.signature(_resolve(name)).parameters.values()
        positional = [a.arg for a in written.posonlyargs + written.args]
        keyword = [a.arg for a in written.kwonlyargs]
        assert positional == [p.name for p in actual if p.kind in (p.POSITIONAL_ONLY,
                                                                   p.POSITIONAL_OR_KEYWORD)], name
        assert keyword == [p.name for p in actual if p.kind == p.KEYWORD_ONLY], (page, name)
        defaults = dict(zip(positional[len(positional) - len(written.defaults):], written.defaults))
        defaults.update({a.arg: d for a, d in zip(written.kwonlyargs, written.kw_defaults) if d is not None})
        for parameter in actual:
            if parameter.default is inspect.Parameter.empty:
                assert parameter.name not in defaults, (page, name, parameter.name)
                continue
            node = defaults[parameter.name]
            value = getattr(lc, node.id) if isinstance(node, ast.Name) else ast.literal_eval(node)
            assert value == parameter.default, (page, name, parameter.name)


def test_the_readme_is_short_keeps_the_design_cards_words_and_its_links_resolve():
    text = _text(os.path.join(ROOT, "README.md"))
    assert len(text.splitlines()) <= 200
    for words in ("python run.py <model>", "pytest -q 001_layers_and_logits", "make test", "make run"):
        assert words in text, words
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    for link in links:
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_every_module_the_docs_name_exists():
    """``layers_core.plots`` was named for a round after it had moved."""
    for page, text in _all_docs().items():
        for dotted in set(re.findall(r"\blayers_core(?:\.\w+)+", text)):
            module, found = dotted, None
            while module and found is None:  # the longest importable prefix, the rest attributes
                try:
                    found = importlib.util.find_spec(module)
                except ModuleNotFoundError:  # a prefix is a module, not a package
                    found = None
                if found is None:
                    module = module.rpartition(".")[0]
            assert found is not None, (page, dotted)
            value = importlib.import_module(module)
            for attribute in dotted[len(module) + 1:].split(".") if dotted != module else []:
                value = getattr(value, attribute, None)
                assert value is not None, (page, dotted)


def test_the_api_page_names_every_part_of_a_lens_model():
    text = _text(os.path.join(DOCS, "api.md"))
    parts = [field.name for field in dataclasses.fields(LensModel) if not field.name.startswith("_")]
    parts += ["n_layers", "model_id"]
    for part in parts:
        assert f"`lm.{part}" in text, part


def test_the_worked_reading_quotes_the_run(bundled_cli_run):
    """docs/outputs.md once said `L_copy` = 19 (it is null; 19 is `L_copy_strict`) and a control
    margin within ±4e-5 at layers 0–29 (it is 0.0174 at layer 29)."""
    document = json.loads(_text(os.path.join(bundled_cli_run, f"{BUNDLED}.json")))
    diagnostics = document["diagnostics"]
    assert diagnostics["L_copy"] is None and diagnostics["L_copy_strict"] == 19
    assert diagnostics["L_semantic"] == diagnostics["L_semantic_stable"] == diagnostics["L_semantic_margin"] == 30
    margins = [row["control_margin"] for row in document["control_margins"]]
    assert max(abs(m) for m in margins[:29]) < 6e-4
    assert round(margins[29], 4) == 0.0174 and round(margins[30], 2) == 0.36
    assert document["control_summary"]["first_control_margin_pos"] == 29
    prose = " ".join(_text(os.path.join(DOCS, "outputs.md")).split())
    for quoted in ("`L_copy` is null", "`L_copy_strict` = 19", "below 6e-4 at layers 0–28", "0.0174 at layer 29",
                   "0.36 at layer 30"):
        assert quoted in prose, quoted


def test_a_gguf_directory_is_named_after_its_file_as_documented(tmp_path):
    from layers_core.model.loading import resolve_model_source

    folder = tmp_path / "my-models"
    folder.mkdir()
    (folder / "llama-q8_0.gguf").write_bytes(b"GGUF")
    assert resolve_model_source(str(folder)).clean_name == "llama-q8_0"
    documented = " ".join(_text(os.path.join(DOCS, "cli.md")).split())
    assert "(`model.gguf` → `output-model-*`), not the directory" in documented


def test_the_failure_page_names_every_flag_a_prompt_set_refuses():
    refused = re.search(r"`--prompts` with (\S+)", _text(os.path.join(DOCS, "failures.md"))).group(1)
    for flag in ("--prompt", "--self-test", "--keep-residuals", "--chat", "--sublayers", "--compare-lenses",
                 "--track"):
        assert f"`{flag}`" in refused, flag
        with pytest.raises(SystemExit):
            cli.parse_config(["--prompts", os.path.join(HERE, "facts", "capitals.jsonl"), flag,
                              *(["x"] if flag in ("--prompt", "--track") else [])])
