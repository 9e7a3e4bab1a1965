"""The pictures of one prompt, and the worker processes that draw them off the critical path.

Torch-free: the workers are forked before torch is imported and must never import it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def _marks(diagnostics: Mapping[str, Any]) -> dict:
    return {"L_copy": diagnostics["L_copy"], "L_semantic": diagnostics["L_semantic"]}


def typing_rule(gold: Mapping[str, Any]) -> dict:
    """How the report's token box reads a typed word: the answer as typed pins its token, and
    another word follows the prompt with the answer's joining (``space`` or ``none``)."""
    return {"text": gold.get("string"), "join": "none" if gold.get("variant") == "no_space" else "space"}


def picture_rows(analysis: Any, heatmap_window: int | None = None, answer_token: str | None = None) -> dict:
    """The plain data the pictures and the HTML report of one prompt are drawn from (no tensors:
    picklable); with ``--sublayers`` the mid-block reads are interleaved (drawn as half-steps).
    ``answer_token``: the answer's first piece as decoded (the report pins it)."""
    from layers_core.results.attribution import attribution_rows
    from layers_core.results.outputs import prompt_table_rows

    records, pure, _, _ = prompt_table_rows(analysis.result)
    if not records:  # records=False: the heatmap is the next-token position's column alone
        records = [{**row, "token": analysis.result.str_tokens[-1]} for row in pure]
    split = getattr(analysis, "attribution", None)
    return {"records": records, "pure_rows": pure,
            "attribution": None if split is None else attribution_rows(split),
            "lens_rows": getattr(analysis, "lens_rows", None),
            "control": control_words(analysis.blocks.get("control_summary")), "answer_token": answer_token,
            "typing": typing_rule(analysis.result.gold),
            "norm_only_semantic": (analysis.blocks.get("raw_lens_check") or {}).get("norm_only_semantic_layer"),
            "comparison_rows": analysis.comparison.pure_rows,
            "comparison_strategy": analysis.comparison.strategy,
            "diagnostics": analysis.blocks["diagnostics"], "heatmap_window": heatmap_window,
            "continuation": continuation_strip(getattr(analysis, "continuation", None))}


def continuation_strip(continuation: Any) -> dict | None:
    """The report's continuation strip (plain data): per lens, each token's row
    (``CONTINUATION_COLUMNS``) and its top-k at every layer."""
    if continuation is None:
        return None
    lenses: dict[str, dict] = {}
    for row in continuation.rows:
        lens = lenses.setdefault(row["lens"], {"rows": [], **continuation.top[row["lens"]]})
        lens["rows"].append(row)
    return {"source": continuation.block["source"], "lenses": lenses}


def control_words(summary: Mapping[str, Any] | None) -> str | None:
    """The report's control line. The margin is p(control answer) − p(answer) on the control
    prompt, so what first leads there is the control answer."""
    if not summary:
        return None
    return (f"{summary['control_prompt']!r} → {summary['control_answer']!r}: {summary['status']}; on the "
            f"control prompt the control answer first leads the answer at layer "
            f"{summary['first_control_margin_pos']}")


def prompt_lens_figure(rows: Mapping[str, Any], title: str):
    """The logit-lens heatmap of one prompt (``picture_rows``), collapse layers marked, over the
    last ``rows["heatmap_window"]`` positions."""
    from layers_core.results import plots

    return plots.lens_heatmap(rows["records"], title, _marks(rows["diagnostics"]),
                              window=rows.get("heatmap_window", plots.HEATMAP_WINDOW))


def prompt_curves_figure(rows: Mapping[str, Any], title: str):
    """Entropy, p(answer), rank and KL per layer, for the chosen and the comparison lens."""
    from layers_core.results import plots

    diagnostics = rows["diagnostics"]
    return plots.layer_curves(
        rows["pure_rows"], title, diagnostics["norm_strategy"]["name"], rows["comparison_rows"],
        rows["comparison_strategy"],
        {**_marks(diagnostics), "first_rank_le_5": diagnostics["milestones"]["first_rank_le_5"],
         "L_semantic_stable": diagnostics["L_semantic_stable"]}, rows.get("attribution"))


def write_lens_pictures(paths: Mapping[str, str], rows: Mapping[str, Any], title: str) -> None:
    """The HTML report and the logit-lens heatmap of one prompt."""
    from layers_core.results import html_report, plots
    from layers_core.run_dir import atomic_write

    atomic_write(paths["html"], html_report.render(html_report.prompt_report_data(rows, title)))
    plots.save_figure(prompt_lens_figure(rows, title), paths["lens_png"])


def write_curve_pictures(paths: Mapping[str, str], rows: Mapping[str, Any], title: str) -> None:
    """The layer curves of one prompt and, with every lens compared, the lens comparison."""
    from layers_core.results import plots

    plots.save_figure(prompt_curves_figure(rows, title), paths["curves_png"])
    if rows.get("lens_rows"):
        plots.save_figure(plots.lens_comparison(rows["lens_rows"], f"{title}: every lens"), paths["lenses_png"])


PROMPT_PICTURES = (write_lens_pictures, write_curve_pictures)  # about equal halves of the drawing


def write_prompt_pictures(paths: Mapping[str, str], rows: Mapping[str, Any], title: str) -> None:
    """Every picture of one prompt (PNGs) and its HTML report."""
    for write in PROMPT_PICTURES:
        write(paths, rows, title)


PR_SET_PDEATHSIG = 1  # prctl(2): a signal the kernel sends this process when its parent dies


def _detach_from_parent(parent_pid: int) -> None:
    """The worker dies with its parent, however the parent ends (SIGKILL included), and never
    holds the caller's stdout/stderr open (a caller waiting for EOF on them would hang)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF and close() still end it
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _serve_pictures(connection: Any, parent_pid: int) -> None:
    """A picture process: import matplotlib and warm its font cache, then draw each request
    ``(fn, args)`` and answer None (or the error, one line) until None arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _detach_from_parent(parent_pid)
    try:
        from layers_core.results import plots

        figure = plots.new_figure((1, 1))
        figure.text(0.5, 0.5, "warm-up")
        figure.canvas.draw()  # loads the font manager and the Agg renderer
    except Exception as error:  # reported with the first request
        connection.recv()
        connection.send(f"{type(error).__name__}: {error}")
        return
    while (request := connection.recv()) is not None:
        fn, args = request
        try:
            fn(*args)
            connection.send(None)
        except Exception as error:  # reported to the parent, which owns the console
            connection.send(f"{type(error).__name__}: {error}")


class PictureWorker:
    """Forked processes that draw a run's pictures while the parent works on (Linux only).

    Start it before torch is imported: the import is single-threaded, so matplotlib's import and
    font cache load on the other core for free; the parent later hands it plain rows
    (``picture_rows``), never tensors. ``processes`` (default 2: a prompt's pictures come in two
    halves, ``PROMPT_PICTURES``) draw side by side; requests go to them in turn. Where ``fork``
    is unavailable, ``submit`` draws inline.
    """

    def __init__(self, processes: int = len(PROMPT_PICTURES)) -> None:
        self._workers: list[_Drawer] = []
        self._next = 0
        if sys.platform.startswith("linux"):
            context = multiprocessing.get_context("fork")
            for index in range(processes):
                connection, child = context.Pipe()
                process = context.Process(target=_serve_pictures, args=(child, os.getpid()), daemon=True,
                                          name=f"layers-core-pictures-{index}")
                process.start()
                self._workers.append(_Drawer(process, connection))

    @property
    def processes(self) -> list[Any]:
        """The drawing processes (empty without ``fork``, and once closed)."""
        return [worker.process for worker in self._workers]

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Starts ``fn(*args)`` in the next process (or runs it now without any)."""
        if not self._workers:
            fn(*args)
            return
        worker = self._workers[self._next % len(self._workers)]
        self._next += 1
        worker.connection.send((fn, args))
        worker.pending += 1

    def wait(self) -> None:
        """Blocks until every submitted request is done; ``RuntimeError`` if one failed."""
        problems = []
        for worker in self._workers:
            while worker.pending:
                worker.pending -= 1
                try:
                    problem = worker.connection.recv()
                except EOFError:
                    problem, worker.pending = f"the picture process exited with code {worker.process.exitcode}", 0
                if problem is not None:
                    problems.append(problem)
        if problems:
            raise RuntimeError(f"drawing the pictures failed: {problems[0]}")

    def close(self) -> None:
        """Ends the processes whether or not they drew anything (what they were drawing is dropped)."""
        for worker in self._workers:
            if not worker.process.is_alive():
                continue
            if worker.pending:
                worker.process.terminate()
            else:
                worker.connection.send(None)
        for process in self.processes:
            process.join(timeout=1.0)
            if process.is_alive():
                process.terminate()
                process.join()
        self._workers = []


@dataclass
class _Drawer:
    """One drawing process of a ``PictureWorker``, its end of the pipe and its unanswered requests."""

    process: Any
    connection: Any
    pending: int = 0
