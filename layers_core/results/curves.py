"""Per-layer curves over a prompt set: each layer's mean over prompts with a bootstrap band.

The figure every logit-lens paper draws. The values are the chosen lens's pure rows (entropy,
``p_answer``, ``answer_rank``, ``kl_to_final_bits``, …) and each concept's probability; a
prompt without a column's value at some layer (no answer, no such concept) is left out of that
column's curve, and ``n`` says how many prompts it holds. The band is a percentile bootstrap of
the mean over prompts: ``BOOTSTRAP_RESAMPLES`` resamples of the prompts with replacement, drawn
by ``numpy.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(resamples, n))`` afresh for
each curve, so a curve's band depends only on its own prompts, in file order (a merge of shards
gives the unsharded run's bands exactly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
DEFAULT_COLUMNS = ("entropy", "p_answer", "answer_rank", "kl_to_final_bits")  # then every concept
CURVE_COLUMNS = ["column", "layer", "mean", "ci_low", "ci_high", "n"]  # grouped: the group keys first
PROBABILITY_COLUMNS = ("p_answer", "p_top1", "p_top5")  # and every concept: they share an axis
_GATHER_BUDGET = 2**24  # resampled values held at a time (float64: 128 MiB)


def layer_values(pure: pd.DataFrame, concepts: pd.DataFrame | None, lens: str) -> pd.DataFrame:
    """One row per (prompt, layer): ``prompt_id``, ``layer``, the pure rows' numeric columns and
    one column per concept (its ``p`` under ``lens``), in the prompts' order."""
    keep = ["prompt_id", "layer", "entropy", "p_top1", "p_top5", "p_answer", "answer_rank", "kl_to_final_bits"]
    values = pure[[column for column in keep if column in pure.columns]].copy()
    values["answer_rank"] = values["answer_rank"].astype("float64")
    if concepts is None or concepts.empty:
        return values
    chosen = concepts[concepts["lens"] == lens]
    wide = chosen.pivot_table(index=["prompt_id", "layer"], columns="concept", values="p", sort=False)
    wide.columns = [str(name) for name in wide.columns]
    return values.merge(wide.reset_index(), on=["prompt_id", "layer"], how="left", sort=False)


def bootstrap_band(matrix: np.ndarray, ci: float, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval ``(low [L], high [L])`` of the mean over the rows of ``matrix``
    ``[n, L]``: the rows resampled with replacement, in chunks of resamples that keep the
    gathered values under a budget (the same draws as one ``(resamples, n)`` call)."""
    n = matrix.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _GATHER_BUDGET // max(1, n * matrix.shape[1]))
    means = []
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means.append(matrix[picks].mean(axis=1))
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(np.concatenate(means), [alpha, 1.0 - alpha], axis=0)
    return low, high


def layer_curves(values: pd.DataFrame, columns: Sequence[str], prompts: pd.DataFrame | None = None,
                 by: str | Sequence[str] | None = None, ci: float = 0.95) -> pd.DataFrame:
    """Per layer (and group) the mean of each column over prompts, its bootstrap interval and n.

    ``values``: ``layer_values``; ``prompts``: one row per prompt (``prompt_id`` and the ``by``
    columns: a summary with its ``meta`` keys). Returns ``[*by, column, layer, mean, ci_low,
    ci_high, n]``. ``ValueError`` for an unknown column or group key, or ``ci`` outside (0, 1).
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be between 0 and 1, got {ci}")
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    unknown = [column for column in columns if column not in values.columns]
    if unknown:
        known = [c for c in values.columns if c not in ("prompt_id", "layer")]
        raise ValueError(f"no column {unknown[0]!r} to draw; the columns are {', '.join(known)}")
    if keys:
        missing = [key for key in keys if prompts is None or key not in prompts.columns]
        if missing:
            raise ValueError(f"no prompt field {missing[0]!r} to group by (a summary column or a meta key)")
        values = values.merge(prompts[["prompt_id", *keys]], on="prompt_id", how="left", sort=False)
    groups = values.groupby(keys, sort=False, dropna=False) if keys else [((), values)]
    rows = []
    for group, part in groups:
        labels = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        for column in columns:
            rows += _curve_rows(part, column, ci, labels)
    return pd.DataFrame(rows, columns=[*keys, *CURVE_COLUMNS])


def _curve_rows(part: pd.DataFrame, column: str, ci: float, labels: Mapping[str, Any]) -> list[dict]:
    layers = sorted(part["layer"].unique())
    matrix = part.pivot(index="prompt_id", columns="layer", values=column)
    matrix = matrix.reindex(index=pd.unique(part["prompt_id"]), columns=layers).to_numpy(dtype="float64")
    matrix = matrix[np.isfinite(matrix).all(axis=1)]  # a prompt without the value at some layer
    if len(matrix) == 0:
        return [{**labels, "column": column, "layer": int(layer), "mean": None, "ci_low": None, "ci_high": None,
                 "n": 0} for layer in layers]
    low, high = bootstrap_band(matrix, ci)
    mean = matrix.mean(axis=0)
    return [{**labels, "column": column, "layer": int(layer), "mean": float(mean[i]), "ci_low": float(low[i]),
             "ci_high": float(high[i]), "n": len(matrix)} for i, layer in enumerate(layers)]


def default_columns(values: pd.DataFrame) -> list[str]:
    """``DEFAULT_COLUMNS`` (those with a value) then every concept column."""
    base = [column for column in DEFAULT_COLUMNS if column in values and values[column].notna().any()]
    fixed = {"prompt_id", "layer", "entropy", "p_top1", "p_top5", "p_answer", "answer_rank", "kl_to_final_bits"}
    return base + [column for column in values.columns if column not in fixed]


def read_layer_values(pure_path: str, concepts_path: str | None, lens: str) -> pd.DataFrame:
    """``layer_values`` of a set's files: its pure next-token CSV and, if written, its concepts
    CSV (only the columns the curves need are read)."""
    wanted = {"prompt_id", "layer", "entropy", "p_top1", "p_top5", "p_answer", "answer_rank", "kl_to_final_bits"}
    pure = pd.read_csv(pure_path, usecols=lambda column: column in wanted, dtype={"prompt_id": str},
                       keep_default_na=False, na_values=[""])
    concepts = None
    if concepts_path is not None:
        concepts = pd.read_csv(concepts_path, dtype={"prompt_id": str, "lens": str, "concept": str},
                               keep_default_na=False, na_values=[""])
    return layer_values(pure, concepts, lens)
