"""Pictures of a sweep: the logit-lens heatmap and per-layer curves (matplotlib, imported lazily).

Every function takes the same row dicts the CSV writers take and returns a ``Figure``; notebooks
display it, scripts save it with ``save_figure``. Figures are built outside pyplot, so no
backend is chosen and no window opens. Colours use
``viridis``, whose luminance rises monotonically, so the figures survive greyscale printing.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

HEATMAP_MAX_ROWS = 36  # deeper models are strided to this many layer rows (the last always shown)
HEATMAP_WINDOW = 48  # positions the heatmap shows of a longer prompt (its last ones)
TOKEN_LABEL_CHARS = 10
CELL_LABEL_CHARS = 7
COLOR_BY = {"p_top1": ("prob1", "p(top-1)"), "entropy": ("entropy", "entropy (bits)")}
_ESCAPES = {"\n": "⏎", "\r": "␍", "\t": "⇥", "$": r"\$"}


def _printable(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    return char if char.isprintable() else f"\\x{ord(char):02x}"


def new_figure(figsize: tuple[float, float]):
    """A ``Figure`` outside pyplot's registry: Jupyter shows a returned figure once, and nothing
    has to be closed."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")  # labels and colour bars never clipped


def display_token(text: str, limit: int = TOKEN_LABEL_CHARS) -> str:
    """A printable, bounded label: control characters shown as symbols, leading space as ␣."""
    shown = "".join(_printable(char) for char in text)
    if shown.startswith(" "):
        shown = "␣" + shown[1:]
    shown = shown or "∅"
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def strided_layers(n_layers_plus_one: int, marked: Sequence[int | None],
                   max_rows: int = HEATMAP_MAX_ROWS) -> list[int]:
    """Layer indices to draw: all if few, else an even stride plus the last and marked layers."""
    last = n_layers_plus_one - 1
    if n_layers_plus_one <= max_rows:
        return list(range(n_layers_plus_one))
    step = -(-n_layers_plus_one // max_rows)
    chosen = set(range(0, n_layers_plus_one, step)) | {last}
    chosen |= {layer for layer in marked if layer is not None and 0 <= layer <= last}
    return sorted(chosen)


def lens_heatmap(
    records: Sequence[Mapping[str, Any]],
    title: str,
    marks: Mapping[str, int | None] | None = None,
    color_by: str = "p_top1",
    max_rows: int = HEATMAP_MAX_ROWS,
    window: int | None = HEATMAP_WINDOW,
):
    """Layers (rows, layer 0 at the bottom) × positions (columns), each cell the top-1 token.

    ``records`` are records rows (``layer``, ``pos``, ``token``, ``top1``, ``prob1``, ``entropy``);
    ``marks`` names layers to flag (e.g. ``{"L_copy": 0, "L_semantic": 30}``). The last column is
    the prediction of the next, unseen token (⟨NEXT⟩). A prompt longer than ``window`` positions
    shows its last ``window`` (noted in the title); None shows all.
    """
    import numpy as np

    key, label = COLOR_BY[color_by]
    halves = any(r.get("sublayer") for r in records)  # --sublayers: a row per half-step
    scale = 2 if halves else 1
    marks = {name: layer * scale for name, layer in (marks or {}).items() if layer is not None}
    n_rows = max(_depth(r, halves) for r in records) + 1
    total_pos = max(int(r["pos"]) for r in records) + 1
    first = 0 if window is None or total_pos <= window else total_pos - window
    if first:
        records = [r for r in records if int(r["pos"]) >= first]
        title = f"{title} — last {window} of {total_pos} positions"
    n_pos = total_pos - first
    layers = strided_layers(n_rows, list(marks.values()), max_rows)
    values = np.full((len(layers), n_pos), np.nan)
    texts = [[""] * n_pos for _ in layers]
    tokens = [""] * n_pos
    row_of = {layer: i for i, layer in enumerate(layers)}
    for record in records:
        layer, pos = _depth(record, halves), int(record["pos"]) - first
        tokens[pos] = str(record["token"])
        if layer in row_of:
            values[row_of[layer], pos] = float(record[key])
            texts[row_of[layer]][pos] = display_token(str(record["top1"]), CELL_LABEL_CHARS)

    width = min(40.0, 2.5 + 0.85 * n_pos)
    height = min(30.0, max(3.6, 1.8 + 0.34 * len(layers)))  # room for the colour bar's label
    fig = new_figure((width, height))
    ax = fig.subplots()
    vmax = 1.0 if color_by == "p_top1" else max(1.0, float(np.nanmax(values)))
    image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax)
    for i in range(len(layers)):
        for j in range(n_pos):
            shade = (values[i, j] / vmax) if np.isfinite(values[i, j]) else 0.0
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=7, in_layout=False,
                    color="black" if shade > 0.6 else "white")
    x_labels = [display_token(t) for t in tokens]
    x_labels[-1] = f"{x_labels[-1]}\n→ ⟨NEXT⟩"
    ax.set_xticks(range(n_pos), x_labels, rotation=60, ha="right", fontsize=8)
    y_labels = [_depth_label(layer, halves) + "".join(f"  ◀ {name}" for name, at in marks.items() if at == layer)
                for layer in layers]
    ax.set_yticks(range(len(layers)), y_labels, fontsize=8)
    for at in set(marks.values()) & set(row_of):
        ax.axhline(row_of[at], color="red", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("prompt position (input token)")
    ax.set_ylabel("layer (0 = embeddings" + ("; ℓ−½: block ℓ−1 after attention" if halves else "") + ")"
                  + (", strided" if len(layers) < n_rows else ""))
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.01)
    return fig


def _depth(row: Mapping[str, Any], halves: bool) -> int:
    """A row's index in depth order: the layer, or with half-steps 2·layer (−1 after attention)."""
    layer = int(row["layer"])
    return 2 * layer - (row.get("sublayer") == "attn") if halves else layer


def _depth_label(depth: int, halves: bool) -> str:
    if not halves:
        return str(depth)
    return str(depth // 2) if depth % 2 == 0 else f"{(depth + 1) // 2}−½ attn"


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of one curve; a mid-block read (``sublayer`` attn) sits half a step before its layer."""
    points = [(int(r["layer"]) - 0.5 * (r.get("sublayer") == "attn"), float(r[key]))
              for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in points], [p[1] for p in points]


def _plot_series(ax, rows: Sequence[Mapping[str, Any]], key: str, log: bool, name: str, style: str) -> None:
    """One lens's curve; on a log axis, values that underflowed to 0 are drawn as ▼ on the floor."""
    xs, ys = _series(rows, key)
    if not log:
        ax.plot(xs, ys, style, marker=".", markersize=4, label=f"{name} lens")
        return
    positive = [(x, y) for x, y in zip(xs, ys) if y > 0]
    line = ax.plot(*zip(*positive), style, marker=".", markersize=4, label=f"{name} lens")[0] if positive \
        else None
    zeros = [x for x, y in zip(xs, ys) if y <= 0]
    if zeros:
        color = line.get_color() if line is not None else None
        ax.plot(zeros, [0.0] * len(zeros), "v", color=color, clip_on=False, transform=ax.get_xaxis_transform(),
                label=f"{name} lens: p = 0 (underflow)")


def layer_curves(
    pure_rows: Sequence[Mapping[str, Any]],
    title: str,
    lens_name: str,
    comparison_rows: Sequence[Mapping[str, Any]] | None = None,
    comparison_name: str | None = None,
    marks: Mapping[str, int | None] | None = None,
    attribution: Sequence[Mapping[str, Any]] | None = None,
):
    """Entropy, p_answer (log, ≤ 1), answer rank (log) and KL to the final layer against layer;
    with ``attribution`` rows, a panel below: each layer's attention and MLP parts of the answer
    logit (bars) and their running sum.

    A probability that underflowed to 0 cannot sit on a log axis: it is drawn as ▼ on the floor.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    panels = [("entropy", "entropy (bits)", "linear"), ("p_answer", "p(answer)", "log"),
              ("answer_rank", "answer rank", "log"), ("kl_to_final_bits", "KL to final (bits)", "linear")]
    fig = new_figure((11, 10.5) if attribution else (11, 7.5))
    grid = fig.add_gridspec(3 if attribution else 2, 2, height_ratios=[1, 1, 0.9] if attribution else None)
    first = fig.add_subplot(grid[0, 0])
    axes = np.array([[first, fig.add_subplot(grid[0, 1], sharex=first)],
                     [fig.add_subplot(grid[1, 0], sharex=first), fig.add_subplot(grid[1, 1], sharex=first)]])
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for rows, name, style in ((pure_rows, lens_name, "-"), (comparison_rows, comparison_name, "--")):
            if rows:
                _plot_series(ax, rows, key, scale == "log", name, style)
        ax.set_yscale(scale)
        if key == "p_answer":
            bottom, top = ax.get_ylim()
            ax.set_ylim(bottom, min(top, 1.0))  # a probability axis never goes above 1
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        colors = ("tab:red", "tab:green", "tab:purple", "tab:orange")
        for (name, layer), color in zip((marks or {}).items(), colors):
            if layer is not None:
                ax.axvline(layer, color=color, linestyle=":", linewidth=1.2, label=name)
    for ax in axes[1]:
        ax.set_xlabel("layer (0 = embeddings)")
    if attribution:
        _attribution_panel(fig.add_subplot(grid[2, :], sharex=first), attribution)
    axes[0][0].legend(fontsize=8, loc="best")
    if any(text.startswith(("arch lens: p = 0", "final lens: p = 0", "none lens: p = 0"))
           for text in axes[0][1].get_legend_handles_labels()[1]):
        axes[0][1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    return fig


_PART_STYLE = {"embed": ("tab:gray", 0.0), "attn": ("tab:blue", -0.2), "mlp": ("tab:orange", 0.2),
               "norm_bias": ("tab:purple", 0.0)}


def _attribution_panel(ax, rows: Sequence[Mapping[str, Any]]) -> None:
    """Bars: each part of the answer logit at its layer (block b's attention and MLP at b+1);
    line: the running sum of the parts (the answer logit, less b_U, after the last)."""
    for component, (color, offset) in _PART_STYLE.items():
        parts = [row for row in rows if row["component"] == component]
        if parts:
            ax.bar([row["layer"] + offset for row in parts], [row["logit"] for row in parts],
                   width=0.38 if offset else 0.5, color=color, label=component)
    after_layer = {row["layer"]: row["cumulative"] for row in rows}  # the sum once a layer's parts are in
    ax.plot(list(after_layer), list(after_layer.values()), color="black", linewidth=1, marker=".",
            label="running sum")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("answer logit parts")
    ax.set_xlabel("layer (block b's parts at b+1)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", ncol=5)


def lens_comparison(rows: Sequence[Mapping[str, Any]], title: str):
    """KL to the final distribution and the answer's rank per layer, one line per lens."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure((11, 4.2))
    axes = fig.subplots(1, 2, sharex=True)
    names = list(dict.fromkeys(row["lens"] for row in rows))
    for name in names:
        own = [row for row in rows if row["lens"] == name]
        axes[0].plot([r["layer"] for r in own], [r["kl_to_final_bits"] for r in own], marker=".", label=name)
        ranked = [r for r in own if r["answer_rank"] is not None]
        if ranked:
            axes[1].plot([r["layer"] for r in ranked], [r["answer_rank"] for r in ranked], marker=".", label=name)
    axes[0].set_ylabel("KL to final (bits)")
    axes[1].set_ylabel("answer rank")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    return fig


MAX_SMALL_MULTIPLES = 120  # prompts drawn in the small-multiples page (the first ones)


def prompt_set_summary(summary_rows: Sequence[Mapping[str, Any]], n_layers: int, title: str):
    """Each prompt's L_semantic (●) and first rank ≤ 5 (■) as fractions of depth, side by side
    within the prompt's row; a prompt that reaches neither is marked ✕ at the right edge."""
    height = 1.6 + 0.32 * len(summary_rows)
    fig = new_figure((8.5, height))
    ax = fig.subplots()
    labels = [display_token(str(row["prompt_id"]), 24) for row in summary_rows]
    for key, marker, color, dodge in (("L_semantic", "o", "tab:blue", -0.17),
                                      ("first_rank_le_5", "s", "tab:orange", 0.17)):
        points = [(row[key] / n_layers, i + dodge) for i, row in enumerate(summary_rows)
                  if row[key] is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, s=28, facecolors="none", edgecolors=color,
                       linewidths=1.4, label=key, zorder=3)
    neither = [i for i, row in enumerate(summary_rows)
               if row["L_semantic"] is None and row["first_rank_le_5"] is None]
    if neither:
        ax.scatter([1.04] * len(neither), neither, marker="x", color="0.45", clip_on=False,
                   label="neither (answer never in the top 5)", zorder=3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in neither:
        ax.get_yticklabels()[i].set_color("0.45")
    ax.set_ylim(len(labels) - 0.5, -0.5)  # the first prompt on top, as in the file
    ax.set_xlim(-0.02, 1.08)
    ax.set_xlabel("depth fraction (layer / n)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def prompt_set_curves(curves: Mapping[str, tuple], title: str, max_panels: int = MAX_SMALL_MULTIPLES,
                      total: int | None = None):
    """Small multiples: each prompt's answer rank (log) per layer, chosen lens solid and the
    comparison lens dashed. ``curves`` maps prompt id → (pure rows, comparison rows, its name),
    the first of ``total`` prompts (default: all of them)."""
    from matplotlib.ticker import MaxNLocator

    shown = list(curves.items())[:max_panels]
    columns = min(6, max(1, len(shown)))
    rows = -(-len(shown) // columns)
    fig = new_figure((2.3 * columns + 0.6, 1.9 * rows + 1.0))
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    for ax, (prompt_id, (pure, comparison, other)) in zip(axes.flat, shown):
        for series, style, name in ((pure, "-", "chosen lens"), (comparison, "--", f"{other} lens")):
            xs, ys = _series(series, "answer_rank")
            if ys:
                ax.plot(xs, ys, style, linewidth=1.1, label=name)
        ax.set_yscale("log")
        ax.set_title(display_token(str(prompt_id), 22), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    axes[0][0].invert_yaxis()  # rank 1 on top (shared by every panel)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.supxlabel("layer (0 = embeddings)", fontsize=9)
    fig.supylabel("answer rank (log; 1 on top)", fontsize=9)
    total = total or len(curves)
    more = f" — first {len(shown)} of {total} prompts" if total > len(shown) else ""
    fig.suptitle(title + more, fontsize=10)
    return fig


_CURVE_LABELS = {"entropy": "entropy (bits)", "answer_rank": "answer rank (log; 1 on top)",
                 "kl_to_final_bits": "KL to the final layer (bits)"}


def layer_bands(curves: Any, title: str, ci: float = 0.95):
    """``results.curves.layer_curves`` drawn: each column's mean per layer with its bootstrap
    band; one column of panels per group, the probabilities (``p_*`` and concepts) together in
    one row and every other column in a row of its own."""
    from layers_core.results.curves import CURVE_COLUMNS

    keys = [column for column in curves.columns if column not in CURVE_COLUMNS]
    groups = list(curves.groupby(keys, sort=False, dropna=False)) if keys else [((), curves)]
    names = list(dict.fromkeys(curves["column"]))
    probabilities = [name for name in names if name not in _CURVE_LABELS]
    panel_rows = ([probabilities] if probabilities else []) + [[name] for name in names if name in _CURVE_LABELS]
    from matplotlib.ticker import MaxNLocator

    fig = new_figure((max(6.4, 3.6 * len(groups) + 0.8), 2.6 * len(panel_rows) + 1.0))
    axes = fig.subplots(len(panel_rows), len(groups), sharex=True, squeeze=False)
    for column, (group, part) in enumerate(groups):
        label = ", ".join(f"{key}={value}" for key, value in zip(keys, group if isinstance(group, tuple)
                                                                  else (group,)))
        for row, members in enumerate(panel_rows):
            ax = axes[row][column]
            for name in members:
                series = part[part["column"] == name].dropna(subset=["mean"])
                line, = ax.plot(series["layer"], series["mean"], linewidth=1.4, label=f"{name} (n={_n(series)})")
                ax.fill_between(series["layer"], series["ci_low"], series["ci_high"], alpha=0.2,
                                color=line.get_color(), linewidth=0)
            if members == ["answer_rank"]:
                ax.set_yscale("log")
                ax.invert_yaxis()
            ax.set_ylabel(_CURVE_LABELS.get(members[0], "probability"), fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7, loc="best")
            if row == 0 and label:
                ax.set_title(label, fontsize=9)
    fig.supxlabel("layer (0 = embeddings)", fontsize=9)
    fig.suptitle(f"{title}\nmean over prompts, {ci:.0%} bootstrap band", fontsize=10)
    return fig


def _n(series: Any) -> int:
    return int(series["n"].max()) if len(series) else 0


def comparison_figure(stats: Mapping[str, Mapping[str, Mapping[str, Any]]], milestones: Sequence[str]):
    """One panel per milestone: each model's median depth fraction over prompts, with its
    interquartile range, models side by side (``merge.comparison_stats``)."""
    models = list(stats)
    columns = min(4, len(milestones))
    rows = -(-len(milestones) // columns)
    fig = new_figure((3.2 * columns, 0.6 + max(2.2, 0.45 * len(models)) * rows))
    axes = fig.subplots(rows, columns, sharex=True, squeeze=False)
    for ax, key in zip(axes.flat, milestones):
        for y, model in enumerate(models):
            cell = stats[model][key]
            if cell["median"] is None:
                ax.text(0.5, y, "never", ha="center", va="center", fontsize=7, color="0.45")
                continue
            ax.errorbar([cell["median"]], [y], xerr=[[cell["median"] - cell["q1"]], [cell["q3"] - cell["median"]]],
                        fmt="o", capsize=3, color=f"C{y % 10}")
            ax.text(1.02, y, f"n={cell['n']}", fontsize=6, va="center", transform=ax.get_yaxis_transform())
        ax.set_yticks(range(len(models)), [display_token(m, 28) for m in models], fontsize=7)
        ax.set_ylim(len(models) - 0.5, -0.5)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(key, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes.flat[len(milestones):]:
        ax.set_visible(False)
    fig.supxlabel("depth fraction (layer / n): median and interquartile range over prompts", fontsize=9)
    return fig


def lens_eval_figure(layers: Sequence[dict], title: str):
    """Held-out KL(final ‖ lens) and top-1 agreement per layer, the logit lens against every
    fitted lens (the rows' other keys)."""
    fig = new_figure((10, 4))
    axes = fig.subplots(1, 2)
    xs = [row["layer"] for row in layers]
    fitted = [key for key in layers[0] if key not in ("layer", "logit")]
    for kind, style in (("logit", "--"), *((name, "-") for name in fitted)):
        axes[0].plot(xs, [row[kind]["kl_final_to_lens_bits"] for row in layers], style, marker=".",
                     label=f"{kind} lens")
        axes[1].plot(xs, [row[kind]["top1_agree"] for row in layers], style, marker=".", label=f"{kind} lens")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(final ‖ lens), bits/token")
    axes[1].set_ylabel("top-1 agreement with the model")
    axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def eval_figure(table: Any, title: str):
    """``api.evaluate.eval_table`` drawn: cross-entropy to the next token and KL(final ‖ lens),
    bits per token per layer, one line per lens with its bootstrap band; then top-1 agreement."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure((13, 4))
    axes = fig.subplots(1, 3)
    panels = (("ce_bits", "cross-entropy to the next token (bits/token)"),
              ("kl_bits", "KL(final ‖ lens) (bits/token)"), ("top1_agree", "top-1 agreement with the model"))
    for lens, part in table.groupby("lens", sort=False):
        for ax, (metric, _) in zip(axes, panels):
            line, = ax.plot(part["layer"], part[metric], marker=".", linewidth=1.3, label=f"{lens} lens")
            ax.fill_between(part["layer"], part[f"{metric}_low"], part[f"{metric}_high"], alpha=0.2,
                            color=line.get_color(), linewidth=0)
    for ax, (_, label) in zip(axes, panels):
        ax.set_ylabel(label, fontsize=9)
        ax.set_xlabel("layer (0 = embeddings)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[2].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Renders ``fig`` to PNG and writes it atomically; the figure is closed afterwards."""
    from layers_core.run_dir import atomic_write

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a glyph the font lacks (CJK, emoji) is drawn as a box
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        # zlib level 1: faster than the default 6; files ≈ 7 % larger
        fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    if fig.canvas.manager is not None:  # a pyplot figure handed in by a caller
        import matplotlib.pyplot as plt

        plt.close(fig)
    atomic_write(path, buffer.getvalue())
