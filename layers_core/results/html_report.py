"""The interactive HTML report: one self-contained file a researcher can open offline and share.

A hand-written renderer (``report_assets/report.js`` and ``report.css``, inlined), no plotting
library: the page is the data of the run as JSON plus ~20 KB of JavaScript that draws the lens
heatmap (hover: a cell's top-k; a token box: any token's rank in every cell), the per-layer curves
of every lens, the attribution bars and the diagnostics in words. A prompt set's page holds a
sortable prompt table whose rows open each prompt's per-layer view, and the distribution of each
milestone as depth fractions; a comparison of models adds each model's median and quartiles.

Torch-free: it is drawn in the picture worker from the same plain rows as the PNGs.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

REPORT_TOP_K = 20  # the records CSV's verbose positions; other positions hold 5
_PROB_DIGITS = 6  # significant digits kept for probabilities (the page shows 4)
_MILESTONES = ("L_copy", "L_semantic", "L_semantic_stable", "first_rank_le_1", "first_rank_le_5",
               "first_rank_le_10", "first_kl_below_1.0")


def _asset(name: str) -> str:
    return resources.files("layers_core.results").joinpath("report_assets", name).read_text(encoding="utf-8")


def _number(value: Any, digits: int | None = None) -> Any:
    """JSON-safe numbers: None for missing or non-finite; probabilities to ``digits`` places."""
    if value is None or value == "":
        return None
    number = float(value)
    if not math.isfinite(number):
        return None
    return float(f"{number:.{digits}g}") if digits else number


class _Vocabulary:
    """Token strings as indices into one list (a 30 × 200 heatmap repeats few tokens)."""

    def __init__(self) -> None:
        self.strings: list[str] = []
        self._index: dict[str, int] = {}

    def id(self, text: str) -> int:
        if text not in self._index:
            self._index[text] = len(self.strings)
            self.strings.append(text)
        return self._index[text]


def _layer_label(row: Mapping[str, Any]) -> str:
    """``12`` for a block row, ``11½`` for the read after block 11's attention (``--sublayers``)."""
    layer = int(row["layer"])
    return f"{layer - 1}½" if row.get("sublayer") == "attn" else str(layer)


def _cells(records: Sequence[Mapping[str, Any]], vocab: _Vocabulary, window: int | None) -> dict:
    """The heatmap: rows in depth order, the last ``window`` positions, each cell's entropy and
    top-k (token ids into ``vocab``, probabilities)."""
    positions = sorted({int(row["pos"]) for row in records})
    shown = positions[-window:] if window else positions
    first = shown[0] if shown else 0
    rows: dict[str, list] = {}
    tokens: dict[int, str] = {}
    for row in records:
        pos = int(row["pos"])
        if pos < first:
            continue
        tokens[pos] = row["token"]
        top = [(row[f"top{k}"], row[f"prob{k}"]) for k in range(1, REPORT_TOP_K + 1)
               if row.get(f"prob{k}") not in (None, "")]
        cell = [_number(row["entropy"]), [vocab.id(str(t)) for t, _ in top],
                [_number(p, _PROB_DIGITS) for _, p in top]]
        rows.setdefault(_layer_label(row), []).append(cell)
    return {"layers": list(rows), "positions": shown, "tokens": [tokens[p] for p in shown],
            "cells": list(rows.values())}


def _depth(row: Mapping[str, Any]) -> float:
    """Where a row sits on the layer axis: its layer, or half a layer before it for the read after
    attention (``--sublayers``), so every lens is plotted by layer, not by row index."""
    return int(row["layer"]) - (0.5 if row.get("sublayer") == "attn" else 0.0)


def _curve(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [{"layer": _layer_label(row), "depth": _depth(row), "entropy": _number(row.get("entropy")),
             "p_answer": _number(row.get("p_answer")), "answer_rank": _number(row.get("answer_rank")),
             "kl_to_final_bits": _number(row.get("kl_to_final_bits"))} for row in rows]


def _curves(rows: Mapping[str, Any]) -> dict[str, list[dict]]:
    """Each lens of the run: the chosen, the comparison, and every compared lens."""
    diagnostics = rows["diagnostics"]
    curves = {diagnostics["norm_strategy"]["name"]: _curve(rows["pure_rows"])}
    if rows.get("comparison_rows"):
        curves.setdefault(rows["comparison_strategy"], _curve(rows["comparison_rows"]))
    for lens in dict.fromkeys(row["lens"] for row in rows.get("lens_rows") or ()):
        curves.setdefault(lens, _curve([row for row in rows["lens_rows"] if row["lens"] == lens]))
    return curves


def _diagnostics(diagnostics: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    consistency = diagnostics.get("last_layer_consistency") or {}
    return {
        "milestones": {key: diagnostics.get(key, (diagnostics.get("milestones") or {}).get(key))
                       for key in _MILESTONES},
        "last_layer_kl_bits": consistency.get("kl_model_to_lens_bits"),
        "last_layer_passed": consistency.get("passed"),
        "last_layer_tolerance_bits": consistency.get("tolerance_bits"),
        "norm": diagnostics["norm_strategy"]["name"],
        **extra,
    }


def _strip(continuation: Mapping[str, Any] | None, vocab: _Vocabulary) -> dict | None:
    """The continuation strip: per lens, each token's text, position, commit layers and final
    probability, and its top-k at every layer (token ids into ``vocab``)."""
    if not continuation:
        return None
    lenses = {}
    for name, lens in continuation["lenses"].items():
        lenses[name] = [
            {"token": row["token"], "pos": int(row["pos"]), "p_final": _number(row["p_final"], _PROB_DIGITS),
             "commit": row["commit_layer"], "top5": row["first_top5_layer"],
             "p_half": row["first_p_over_half_layer"],
             "top": [[vocab.id(str(t)) for t in cell] for cell in tokens],
             "probs": [[_number(p, _PROB_DIGITS) for p in cell] for cell in probs]}
            for row, tokens, probs in zip(lens["rows"], lens["tokens"], lens["probs"])]
    return {"source": continuation["source"], "lenses": lenses}


PROVENANCE_SHOWN = ("model_path", "model_source", "gguf_sha256", "dtype", "device", "started_at",
                    "torch_version", "transformers_version", "transformer_lens_version", "layers_core_version")


def page_provenance(block: Mapping[str, Any] | None) -> dict | None:
    """What the page says of where its numbers come from: model (path, source, a GGUF file's
    sha256), dtype, device, date and versions, from the JSON ``provenance`` block."""
    if not block:
        return None
    from layers_core import __version__

    flat = {**block, "gguf_sha256": (block.get("gguf") or {}).get("gguf_sha256"),
            "layers_core_version": __version__}
    return {key: str(flat[key]) for key in PROVENANCE_SHOWN if flat.get(key) not in (None, "")}


def prompt_report_data(rows: Mapping[str, Any], title: str) -> dict:
    """The page's data for one prompt, from ``pictures.picture_rows`` (plain data)."""
    vocab = _Vocabulary()
    heatmap = _cells(rows["records"], vocab, rows.get("heatmap_window"))
    pure = rows["pure_rows"]
    last_answer = [{"layer": _layer_label(row), "rank": _number(row.get("answer_rank")),
                    "p": _number(row.get("p_answer"))} for row in pure]
    diagnostics = rows["diagnostics"]
    answer = rows.get("answer_token")  # the first piece, decoded: what the answer columns rank
    return {
        "kind": "prompt", "title": title, "vocab": vocab.strings, "heatmap": heatmap,
        "answer": answer, "answer_last": last_answer, "curves": _curves(rows),
        "typing": rows.get("typing"),  # {text, join}: a typed word resolves as --answer does
        "provenance": page_provenance(rows.get("provenance")),
        "attribution": rows.get("attribution"),
        "continuation": _strip(rows.get("continuation"), vocab),
        "diagnostics": _diagnostics(diagnostics, {"control": rows.get("control"),
                                                  "norm_only_semantic": rows.get("norm_only_semantic")}),
    }


def band_series(curves: Any) -> dict[str, list[dict]]:
    """``results.curves.layer_curves`` (ungrouped) for the page: per column, each layer's mean,
    band and n."""
    series: dict[str, list[dict]] = {}
    for row in curves.to_dict("records"):
        series.setdefault(str(row["column"]), []).append(
            {"layer": int(row["layer"]), "mean": _number(row["mean"]), "low": _number(row["ci_low"]),
             "high": _number(row["ci_high"]), "n": int(row["n"])})
    return series


def set_report_data(summary: Sequence[Mapping[str, Any]], curves: Mapping[str, tuple], n_layers: int,
                    title: str, records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                    window: int | None = None, lens_name: str = "chosen") -> dict:
    """The page's data for a prompt set: the summary rows, each prompt's pure rows under both
    lenses (curves and the last position's top-5 per layer), the milestones as depth fractions;
    with ``records`` (a set run with ``--records``) each prompt's heatmap too (the last
    ``window`` positions)."""
    vocab = _Vocabulary()
    prompts = {}
    for prompt_id, (pure, other, other_name) in curves.items():
        rows = (records or {}).get(prompt_id)
        prompts[str(prompt_id)] = {
            **({"heatmap": _cells(rows, vocab, window)} if rows else {}),
            "curves": {lens_name: _curve(pure), other_name: _curve(other)},
            "top": [[vocab.id(str(row.get(f"top{k}", ""))) for k in range(1, 6)] for row in pure],
            "probs": [[_number(row.get(f"prob{k}"), _PROB_DIGITS) for k in range(1, 6)] for row in pure],
        }
    columns = list(summary[0]) if summary else []
    return {"kind": "set", "title": title, "vocab": vocab.strings, "n_layers": n_layers, "columns": columns,
            "summary": [{key: (_number(value) if isinstance(value, (int, float)) else value)
                         for key, value in row.items()} for row in summary],
            "prompts": prompts, "milestones": list(_MILESTONES), "comparison": None}


def comparison_report_data(rows: Sequence[Mapping[str, Any]], stats: Mapping[str, Any], title: str) -> dict:
    """The page of a comparison of models: the ``comparison.csv`` rows as a sortable table (depth
    fractions), and one panel per milestone with each model's median and quartiles."""
    columns = list(rows[0]) if rows else []
    return {"kind": "set", "title": f"comparison of {title}", "vocab": [], "n_layers": 1, "columns": columns,
            "summary": [dict(row) for row in rows], "prompts": {},
            "milestones": [f"{key}_fraction" for key in _MILESTONES], "comparison": stats}


def render(data: Mapping[str, Any]) -> str:
    """The whole self-contained page (CSS and JavaScript inlined, the data as JSON)."""
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    payload = payload.replace("</", "<\\/")  # never close the script element early
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(str(data['title']))}</title><style>{_asset('report.css')}</style></head>"
        f"<body><div id=\"report\"></div><script type=\"application/json\" id=\"report-data\">{payload}</script>"
        f"<script>{_asset('report.js')}</script></body></html>\n"
    )


def explorer_page(info: Mapping[str, Any]) -> str:
    """The live explorer's page (``layers-and-logits serve``): a prompt box, an answer box, a
    lens switch and a continuation length above the report's renderer, which draws each answer;
    ``info`` (model, lenses, limits) as JSON. Self-contained, as the report."""
    payload = json.dumps(info, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"layers-and-logits explorer: {info['model']}")
    prompt = html.escape(str(info.get("prompt") or ""), quote=True)
    answer = html.escape(str(info.get("answer") or ""), quote=True)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title}</title><link rel=\"icon\" href=\"data:,\"><style>{_asset('report.css')}</style>"
        f"</head><body><div id=\"explorer\"><h1>{title}</h1><div class=\"form\">"
        f"<textarea id=\"prompt\" rows=\"2\" placeholder=\"a prompt\">{prompt}</textarea>"
        f"<input id=\"answer\" placeholder=\"answer (optional)\" value=\"{answer}\">"
        "<select id=\"lens\"></select>"
        f"<label>continue <input id=\"generate\" type=\"number\" min=\"0\" max=\"{int(info['max_generate'])}\" "
        "value=\"0\"> tokens</label><button id=\"run\">read</button>"
        "<button id=\"download\">download files</button>"
        "<span id=\"status\"></span></div></div><div id=\"report\"></div>"
        f"<script type=\"application/json\" id=\"explorer-info\">{payload}</script>"
        f"<script>{_asset('report.js')}</script><script>{_asset('explorer.js')}</script></body></html>\n"
    )


def embedded(data: Mapping[str, Any]) -> str:
    """The page for a notebook cell (``_repr_html_``): an iframe holding it, so its script and
    styles run isolated from the notebook's."""
    return (f'<iframe srcdoc="{html.escape(render(data), quote=True)}" '
            'style="width:100%;height:900px;border:0" sandbox="allow-scripts"></iframe>')
