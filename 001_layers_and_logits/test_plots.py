"""plots: real PNGs from run.py, figures from synthetic rows of any depth, --no-plots; the picture
worker's processes."""

import os
import struct
import time

import pytest
import run

from layers_core.results.pictures import PictureWorker
from layers_core.results.plots import display_token, layer_curves, lens_heatmap, save_figure, strided_layers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == PNG_MAGIC
    return struct.unpack(">II", head[16:24])


def _synthetic(n_layers, tokens):
    records, pure = [], []
    for layer in range(n_layers + 1):
        for pos, tok in enumerate(tokens):
            p1 = min(0.99, 0.01 + layer / (n_layers + 1))
            records.append({"layer": layer, "pos": pos, "token": tok, "top1": tok[::-1] or "x",
                            "prob1": p1, "entropy": 10 * (1 - p1)})
        pure.append({"layer": layer, "pos": len(tokens) - 1, "entropy": 5.0 - layer / n_layers,
                     "p_answer": 10 ** -(n_layers - layer), "answer_rank": n_layers - layer + 1,
                     "kl_to_final_bits": float(n_layers - layer)})
    return records, pure


@pytest.mark.parametrize("n_layers", [2, 80])
def test_figures_from_synthetic_rows_of_any_depth(tmp_path, n_layers):
    tokens = ["<bos>", " Ber", "lin\n", "🙂", "a$b", "", "\x0b"]
    records, pure = _synthetic(n_layers, tokens)
    marks = {"L_copy": None, "L_semantic": n_layers - 3 if n_layers > 3 else None}
    heat = lens_heatmap(records, "title", marks, color_by="entropy")
    rows_drawn = len(heat.axes[0].get_yticks())
    assert rows_drawn == (n_layers + 1 if n_layers < 36 else rows_drawn)
    assert rows_drawn <= 40
    labels = [t.get_text() for t in heat.axes[0].get_yticklabels()]
    assert labels[-1].startswith(str(n_layers))  # the last layer is always shown
    assert "entropy (bits)" in heat.axes[1].get_ylabel()
    save_figure(heat, str(tmp_path / "h.png"))
    curves = layer_curves(pure, "title", "arch", pure, "final", {})
    save_figure(curves, str(tmp_path / "c.png"))
    width, height = _png_size(tmp_path / "h.png")
    assert width > 300 and height > 150
    assert os.path.getsize(tmp_path / "c.png") > 20_000  # real content, not an empty canvas


def test_strided_layers_keep_last_and_marked():
    chosen = strided_layers(81, [37, None], max_rows=20)
    assert chosen[0] == 0 and chosen[-1] == 80 and 37 in chosen and len(chosen) <= 23
    assert strided_layers(10, []) == list(range(10))


def test_display_token_escapes_and_truncates():
    assert display_token("x\ny") == "x⏎y"
    assert display_token(" Berlin") == "␣Berlin"
    assert display_token("") == "∅"
    assert display_token("\x0b") == "\\x0b"
    assert display_token("abcdefghijklmnop", 6) == "abcde…"


def test_run_writes_both_pngs_and_no_plots_writes_none(tiny_dirs, tmp_path):
    assert run.main(["--device", "cpu", tiny_dirs["gemma2"], "--out_dir", str(tmp_path / "with"), "--quiet"]) == 0
    for suffix in ("lens", "curves"):
        width, _ = _png_size(tmp_path / "with" / f"output-gemma2-{suffix}.png")
        assert width > 300
    assert run.main(["--device", "cpu", tiny_dirs["gemma2"], "--out_dir", str(tmp_path / "without"), "--quiet",
                     "--no-plots"]) == 0
    assert not [f for f in os.listdir(tmp_path / "without") if f.endswith(".png")]


def _all_text_inside(figure):
    """Every drawn label, tick label, colour bar and title lies inside the figure (nothing clipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = figure.bbox
    extents = [ax.get_tightbbox(renderer) for ax in figure.axes]
    extents += [text.get_window_extent(renderer) for text in figure.texts if text.get_text()]
    for extent in extents:
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, (extent, box)
        assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, (extent, box)


@pytest.mark.parametrize("n_layers,tokens", [(2, ["<bos>", "Hi"]), (3, ["x"])])
def test_small_figures_clip_no_label(n_layers, tokens):
    records, pure = _synthetic(n_layers, tokens)
    _all_text_inside(lens_heatmap(records, "tiny-model — arch lens — 'Hi'", {"L_semantic": 1}))
    _all_text_inside(layer_curves(pure, "tiny-model — arch lens — 'Hi'", "arch", pure, "final"))


def test_probability_axis_stops_at_one_and_underflow_is_marked():
    records, pure = _synthetic(4, ["a", "b"])
    pure[0]["p_answer"] = 0.0  # underflowed: cannot sit on a log axis
    pure[-1]["p_answer"] = 0.999
    figure = layer_curves(pure, "t", "arch")
    p_axis = figure.axes[1]
    assert p_axis.get_ylabel() == "p(answer)" and p_axis.get_ylim()[1] <= 1.0
    labels = p_axis.get_legend_handles_labels()[1]
    assert "arch lens: p = 0 (underflow)" in labels
    ticks = [t for t in figure.axes[2].get_xticks() if 0 <= t <= 4]
    assert all(float(t).is_integer() for t in ticks)  # layers are whole numbers


def test_titles_name_the_model_not_its_path(tiny_dirs, tmp_path):
    import layers_core as lc

    result = lc.sweep(lc.load(tiny_dirs["llama"], device="cpu"), "Hi", "x", control=False)
    assert result.title().startswith("llama — final lens") and tiny_dirs["llama"] not in result.title()


def _write_pid(path):
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))


def _draw_slowly_then_fail(path):
    time.sleep(0.2)
    raise ValueError("no ink")


def test_picture_worker_draws_side_by_side_and_reports_a_failure_in_one_line(tmp_path):
    worker = PictureWorker()
    try:
        worker.submit(_write_pid, str(tmp_path / "a"))
        worker.submit(_write_pid, str(tmp_path / "b"))
        worker.wait()
        pids = {(tmp_path / name).read_text() for name in "ab"}
        assert len(pids) == 2 and str(os.getpid()) not in pids  # two processes, neither of them us
        worker.submit(_write_pid, str(tmp_path / "c"))  # the processes serve more than one request
        worker.submit(_draw_slowly_then_fail, str(tmp_path / "d"))
        with pytest.raises(RuntimeError, match=r"^drawing the pictures failed: ValueError: no ink$"):
            worker.wait()
        assert (tmp_path / "c").read_text() in pids
    finally:
        processes = worker.processes
        worker.close()
    assert processes and not any(process.is_alive() for process in processes)


def test_closing_a_busy_picture_worker_drops_its_work_at_once(tmp_path):
    worker = PictureWorker(processes=1)
    processes = worker.processes
    worker.submit(time.sleep, 30)
    started = time.perf_counter()
    worker.close()
    assert time.perf_counter() - started < 5 and not any(process.is_alive() for process in processes)


def test_picture_rows_are_plain_data_the_torch_free_workers_can_unpickle(load_bridge):
    """What goes to the picture processes names no class: a ``TorchVersion`` in the provenance
    made each worker import torch to unpickle it, and a run waited 0.8–1.4 s for its pictures."""
    import pickle
    import pickletools

    import layers_core as lc
    from layers_core.pipeline.sweep import SweepSettings

    rows = lc.sweep(lc.load(load_bridge("llama")), "The capital of France is", "Paris",
                    settings=SweepSettings(attribution=True, generate=2)).picture_rows()
    assert rows["provenance"]["torch_version"] and rows["continuation"] is not None
    ops = [op.name for op, _, _ in pickletools.genops(pickle.dumps(rows))]
    assert not {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ"} & set(ops)
