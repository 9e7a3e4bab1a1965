"""A tuned lens (Belrose et al. 2023) fitted in closed form, in the tuned-lens library's format.

Layer ℓ < L gets an affine translator ``h' = h + h @ W_ℓ.T + b_ℓ`` (the last layer needs none),
decoded like the model's own last layer: final norm → unembedding → post-unembed transform. The
translators are fitted by ridge regression of ``h_L − h_ℓ`` on ``h_ℓ`` (streamed normal equations in
float64, position 0 excluded, the ridge chosen by held-out error), which on a CPU reaches in a
minute what gradient descent on KL reaches in hours. Saved as the library saves a lens:
``config.json`` (``TunedLensConfig`` fields) and ``params.pt`` (the state dict of its
``layer_translators``: ``{i}.weight``, ``{i}.bias``).
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from layers_core.errors import first_line
from layers_core.lens.protocol import describe_plan, plan_warnings
from layers_core.norm_utils import apply_norm_or_skip

CONFIG_FILE, PARAMS_FILE = "config.json", "params.pt"
LENS_TYPE = "linear_tuned_lens"
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # × the mean eigenvalue of the centred XᵀX


@dataclass(frozen=True)
class TunedLens:
    """Translators for residual indices 0..L−1: ``weights`` ``[L, d, d]``, ``biases`` ``[L, d]``.

    A ``Lens``: ``transform`` translates, then applies the model's final norm (``bind(model)``
    attaches it; ``sweep`` binds the lens it is given).
    """

    weights: Tensor
    biases: Tensor
    base_model: str = ""
    final_norm: Any = field(default=None, compare=False, repr=False)
    fingerprint: dict | None = field(default=None, compare=False)  # the fitted model's config/W_U hashes
    path: str | None = field(default=None, compare=False)  # where it was loaded from
    name: ClassVar[str] = "tuned"

    def bind(self, model: Any) -> TunedLens:
        """This lens with ``model``'s final norm (``ln_final``), checked to fit the model."""
        self.check_fits(int(model.cfg.n_layers), int(model.cfg.d_model))
        return replace(self, final_norm=getattr(model, "ln_final", None))

    def transform(self, residual: Tensor, layer: int) -> Tensor:
        """Translator ``layer``, then the final norm (``bind`` first)."""
        if self.final_norm is None:
            raise ValueError("TunedLens.transform needs the model's final norm: call lens.bind(model)")
        return apply_norm_or_skip(self.translate(residual, layer), self.final_norm, None, "ln_final")

    def per_layer(self) -> list[dict]:
        return describe_plan([(self.final_norm, "ln_final")] * (self.n_translators + 1))

    @property
    def warnings(self) -> list[str]:
        return plan_warnings([(self.final_norm, "ln_final")])

    @property
    def n_translators(self) -> int:
        return int(self.weights.shape[0])

    def translate(self, resid: Tensor, layer: int) -> Tensor:
        """``h + h @ W_ℓ.T + b_ℓ`` in float32 on ``resid``'s device, cast back; identity for ℓ ≥ L."""
        if layer >= self.n_translators:
            return resid
        x = resid.float()
        weight = self.weights[layer].to(device=x.device)
        bias = self.biases[layer].to(device=x.device)
        return (x + x @ weight.T + bias).to(resid.dtype)

    def save(self, directory: str) -> None:
        """``config.json`` + ``params.pt`` in the tuned-lens library's layout (atomic writes)."""
        import io

        from layers_core.run_dir import atomic_write

        os.makedirs(directory, exist_ok=True)
        config = {"base_model_name_or_path": self.base_model, "d_model": int(self.weights.shape[-1]),
                  "num_hidden_layers": self.n_translators, "bias": True, "base_model_revision": None,
                  "unembed_hash": (self.fingerprint or {}).get("unembed_hash"), "lens_type": LENS_TYPE,
                  "config_hash": (self.fingerprint or {}).get("config_hash")}
        atomic_write(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2) + "\n")
        state = {}
        for index in range(self.n_translators):
            state[f"{index}.weight"] = self.weights[index].float().contiguous()
            state[f"{index}.bias"] = self.biases[index].float().contiguous()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(os.path.join(directory, PARAMS_FILE), buffer.getvalue())

    @classmethod
    def load(cls, directory: str) -> TunedLens:
        """Reads a lens saved by ``save`` or by the tuned-lens library."""
        config_path, params_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, PARAMS_FILE)
        if not (os.path.isfile(config_path) and os.path.isfile(params_path)):
            raise FileNotFoundError(f"no tuned lens in {directory} (expected {CONFIG_FILE} and {PARAMS_FILE}); "
                                    "fit one with `layers-and-logits fit`")
        config = read_lens_config(config_path)
        try:
            state = torch.load(params_path, map_location="cpu", weights_only=True)
        except DAMAGED_FILE_ERRORS as error:
            raise ValueError(f"{params_path}: not a readable tuned-lens state dict "
                             f"({type(error).__name__}: {first_line(error)})") from error
        count = config.get("num_hidden_layers")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{config_path}: num_hidden_layers must be a positive integer, got {count!r}")
        tensors = state if isinstance(state, dict) else {}
        # counted against the file, never by walking range(count): a config may claim 10**18 layers
        present = sum(f"{i}.weight" in tensors for i in range(min(count, len(tensors))))
        if present < count:
            first = next(i for i in range(count) if f"{i}.weight" not in tensors)
            raise ValueError(f"{params_path}: no tensor {first}.weight ({count - present} of the {count} "
                             "translators' weights missing)")
        try:
            weights = torch.stack([state[f"{i}.weight"].float() for i in range(count)])
            d_model = weights.shape[-1]
            biases = torch.stack([state.get(f"{i}.bias", torch.zeros(d_model)).float() for i in range(count)])
        except (RuntimeError, TypeError, AttributeError) as error:
            raise ValueError(f"{params_path}: translators of different shapes or types "
                             f"({type(error).__name__}: {first_line(error)})") from error
        fingerprint = {key: config.get(key) for key in ("config_hash", "unembed_hash")}
        return cls(weights, biases, config.get("base_model_name_or_path", ""),
                   fingerprint=fingerprint if any(fingerprint.values()) else None, path=directory)

    def check_fits(self, n_layers: int, d_model: int) -> None:
        """``ValueError`` unless the lens has one translator per block of a ``d_model`` model."""
        if (self.n_translators, int(self.weights.shape[-1])) != (n_layers, d_model):
            raise ValueError(f"the tuned lens has {self.n_translators} translators of width "
                             f"{self.weights.shape[-1]}; the model has {n_layers} layers of width {d_model}")


# what torch.load raises for a damaged file: a bad pickle, zip or header, a truncated stream
DAMAGED_FILE_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, IndexError, KeyError,
                       ValueError, OSError)


def read_lens_config(path: str) -> dict:
    """A tuned lens's ``config.json`` as a dict; ``ValueError`` naming the file when it is not
    valid UTF-8 JSON holding an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: not a valid tuned-lens config "
                         f"({type(error).__name__}: {first_line(error)})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a valid tuned-lens config (a JSON {type(config).__name__}, not an object)")
    return config


# ---- fitting ----------------------------------------------------------------------------------

class NormalEquations:
    """Streamed float64 sufficient statistics of ``Y = h_L − h_ℓ`` on ``X = h_ℓ``, every layer."""

    def __init__(self, n_layers: int, d_model: int):
        shape = (n_layers, d_model)
        self.count = 0
        self.sum_x = torch.zeros(shape, dtype=torch.float64)
        self.sum_y = torch.zeros(shape, dtype=torch.float64)
        self.xtx = torch.zeros((n_layers, d_model, d_model), dtype=torch.float64)
        self.xty = torch.zeros((n_layers, d_model, d_model), dtype=torch.float64)
        self.yty = torch.zeros(n_layers, dtype=torch.float64)

    def add(self, residuals: Tensor) -> None:
        """Adds rows ``[L+1, rows, d]`` (every residual index at the same token positions)."""
        final = residuals[-1].to(torch.float64)
        for layer in range(self.sum_x.shape[0]):
            x = residuals[layer].to(torch.float64)
            y = final - x
            self.sum_x[layer] += x.sum(0)
            self.sum_y[layer] += y.sum(0)
            self.xtx[layer] += x.T @ x
            self.xty[layer] += x.T @ y
            self.yty[layer] += (y * y).sum()
        self.count += int(residuals.shape[1])


def _centred(stats: NormalEquations, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(eigenvalues, eigenvectors of the centred XᵀX/n, centred XᵀY/n, mean x, mean y)."""
    n = stats.count
    mean_x, mean_y = stats.sum_x[layer] / n, stats.sum_y[layer] / n
    sxx = stats.xtx[layer] / n - torch.outer(mean_x, mean_x)
    sxy = stats.xty[layer] / n - torch.outer(mean_x, mean_y)
    eigenvalues, vectors = torch.linalg.eigh(sxx)
    return eigenvalues, vectors, sxy, mean_x, mean_y


def _heldout_error(held: NormalEquations, layer: int, a: Tensor, b: Tensor) -> float:
    """Mean squared error of ``Y ≈ X @ a + b`` on held-out statistics."""
    n = held.count
    total = (held.yty[layer] - 2 * (a * held.xty[layer]).sum() - 2 * b @ held.sum_y[layer]
             + (a * (held.xtx[layer] @ a)).sum() + 2 * b @ (a.T @ held.sum_x[layer]) + n * b @ b)
    return float(total / n)


def solve_translators(train: NormalEquations, heldout: NormalEquations,
                      grid: Sequence[float] = RIDGE_GRID) -> tuple[Tensor, Tensor, list[float]]:
    """Ridge solutions per layer, the ridge chosen by held-out error: (W ``[L, d, d]``, b ``[L, d]``,
    the chosen ridge per layer, relative to the mean eigenvalue)."""
    weights, biases, chosen = [], [], []
    for layer in range(train.sum_x.shape[0]):
        eigenvalues, vectors, sxy, mean_x, mean_y = _centred(train, layer)
        rotated = vectors.T @ sxy
        scale = float(eigenvalues.clamp(min=0).mean())
        best = None
        for ridge in grid:
            a = vectors @ (rotated / (eigenvalues.clamp(min=0) + ridge * scale).unsqueeze(1))
            b = mean_y - mean_x @ a
            error = _heldout_error(heldout, layer, a, b)
            if best is None or error < best[0]:
                best = (error, a, b, ridge)
        weights.append(best[1].T.to(torch.float32))  # h @ a = h @ W.T
        biases.append(best[2].to(torch.float32))
        chosen.append(best[3])
    return torch.stack(weights), torch.stack(biases), chosen


# ---- training text ----------------------------------------------------------------------------

DOCSTRING_MODULES = ("collections", "functools", "itertools", "json", "os", "pathlib", "re", "string",
                     "textwrap", "typing", "argparse", "logging", "datetime", "decimal", "fractions",
                     "statistics", "random", "unittest", "inspect", "dataclasses", "asyncio", "email",
                     "http.client", "urllib.parse", "xml.etree.ElementTree", "sqlite3", "csv", "zipfile",
                     "tarfile", "shutil", "subprocess", "threading", "multiprocessing", "socket")


def stdlib_documentation() -> Iterator[str]:
    """Python's own documentation, offline on every machine: the ``pydoc_data`` topics (sorted),
    then long docstrings of a fixed list of standard-library modules (in a fixed order)."""
    import importlib
    import inspect
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for _, member in sorted(inspect.getmembers(module), key=lambda pair: pair[0]):
            doc = inspect.getdoc(member) if callable(member) or inspect.ismodule(member) else None
            if doc and len(doc) >= 400:
                yield doc


def read_corpus(paths: Sequence[str]) -> Iterator[str]:
    """Texts from files: ``.jsonl`` lines with a ``text`` field, anything else as plain text."""
    for path in paths:
        with open(path, encoding="utf-8-sig") as handle:
            if path.endswith(".jsonl"):
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise ValueError(f"{path}:{number}: expected a JSON object with a 'text' string")
                        yield record["text"]
            else:
                yield handle.read()


def token_stream(tokenizer, texts: Iterable[str]) -> Iterator[int]:
    """The texts' token ids, each text followed by a blank line, as one stream (read lazily)."""
    for text in texts:
        yield from tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]


def take_chunks(tokenizer, tokens: Iterator[int], chunk_tokens: int, max_tokens: int) -> list[list[int]]:
    """Chunks of ``chunk_tokens`` (BOS first where the tokenizer has one) taken from the stream
    ``tokens`` until ``max_tokens`` or its end; what is left stays in the stream."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = chunk_tokens - len(bos)
    chunks = []
    while len(chunks) * chunk_tokens < max_tokens:
        piece = list(itertools.islice(tokens, body))
        if len(piece) < body:
            break
        chunks.append(bos + piece)
    return chunks


def token_chunks(tokenizer, texts: Iterable[str], chunk_tokens: int, max_tokens: int) -> list[list[int]]:
    """The texts' tokens, concatenated and cut into chunks of ``chunk_tokens`` (BOS first where the
    tokenizer has one), until ``max_tokens``; deterministic."""
    return take_chunks(tokenizer, token_stream(tokenizer, texts), chunk_tokens, max_tokens)


def split_heldout(chunks: Sequence[list[int]], every: int = 8) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out): every ``every``-th chunk is held out."""
    return ([c for i, c in enumerate(chunks) if i % every != every - 1],
            [c for i, c in enumerate(chunks) if i % every == every - 1])


def default_lens_dir(clean_name: str) -> str:
    """The per-model lens cache, next to the bundled model's: ``<cache root>/tuned-lens/<name>``."""
    from layers_core.model.loading import default_cache_root

    return os.path.join(default_cache_root(), "tuned-lens", clean_name)


def load_for_model(path: str | None, lm: Any) -> TunedLens:
    """The registry's loader: the lens in ``path`` (default: this model's lens cache)."""
    return TunedLens.load(path or default_lens_dir(lm.source.clean_name))
