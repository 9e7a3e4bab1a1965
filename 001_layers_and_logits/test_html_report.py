"""The HTML report in a real browser (headless Chromium through selenium), and in a notebook.

These tests never skip: without Chromium and chromedriver they fail, naming what to install
(``make test`` installs the Debian packages ``chromium`` and ``chromium-driver`` when it can).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import HERE, RUN_PY

BATTERY = os.path.join(HERE, "facts", "capitals.jsonl")
NAME = "SmolLM2-135M-Instruct"


def _open(driver, path):
    driver.get("file://" + str(path))
    driver.get_log("browser")  # nothing from an earlier page counts


def _js_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _shown(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)[1:-1]  # how the page writes a token


@pytest.fixture(scope="module")
def prompt_run(bundled_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    subprocess.run([sys.executable, RUN_PY, "--out_dir", str(out), "--compare-lenses", "--generate", "6",
                    "--quiet"], check=True)
    return out


def _top_k(row):
    return [(row[f"top{k}"], float(row[f"prob{k}"])) for k in range(1, 21) if row.get(f"prob{k}")]


def test_one_cell_per_layer_and_position_and_no_javascript_error(browser, prompt_run):
    _open(browser, prompt_run / f"output-{NAME}.html")
    records = _read_csv(prompt_run / f"output-{NAME}-records.csv")
    cells = browser.find_elements("css selector", "#heatmap td.cell")
    assert len(cells) == len(records) == 31 * 17
    assert {(c.get_attribute("data-layer"), c.get_attribute("data-pos")) for c in cells} == \
        {(r["layer"], r["pos"]) for r in records}
    assert _js_errors(browser) == []
    document = json.load(open(prompt_run / f"output-{NAME}.json"))
    words = browser.find_element("css selector", "ul.diag").text
    norm_only = "the answer is rank 1 only after normalisation" in words
    assert norm_only == document["raw_lens_check"]["norm_only_semantic_layer"]
    assert f"rank 1 at layer {document['diagnostics']['milestones']['first_rank_le_1']}" in words
    assert "passed" in words and "Control:" in words
    assert len(browser.find_elements("css selector", "svg.chart path[data-lens]")) == 4 * 3  # final, arch, none
    assert browser.find_elements("css selector", "#attribution rect[data-component='mlp']")
    browser.save_screenshot(str(prompt_run / "report.png"))
    assert _js_errors(browser) == []


def test_the_page_says_where_its_numbers_come_from_and_labels_its_axes(browser, prompt_run):
    from selenium.webdriver import ActionChains

    _open(browser, prompt_run / f"output-{NAME}.html")
    facts = json.load(open(prompt_run / f"output-{NAME}.json"))["provenance"]
    shown = {span.get_attribute("data-key"): span.text.split(": ", 1)[1]
             for span in browser.find_elements("css selector", "#provenance span")}
    assert shown["model_path"] == facts["model_path"] and shown["dtype"] == facts["dtype"]
    assert shown["device"] == facts["device"] and shown["started_at"] == facts["started_at"]
    assert shown["torch_version"] == facts["torch_version"] and "layers_core_version" in shown
    for chart in browser.find_elements("css selector", "svg.chart:not(#attribution)"):  # layers 0..30
        ticks = [t.text for t in chart.find_elements("css selector", "text.xtick")]
        assert ticks[0] == "0" and ticks[-1] == "30" and len(ticks) >= 4
    attribution = browser.find_element("id", "attribution")
    values = sorted(float(t.text) for t in attribution.find_elements("css selector", "text.ytick"))
    rows = _read_csv(prompt_run / f"output-{NAME}-attribution.csv")
    logits = [float(r["logit"]) for r in rows]
    step = values[1] - values[0]
    assert len(values) >= 3 and values[0] <= min(logits) < values[0] + step  # the bars' scale, enclosing them
    assert values[-1] - step < max(logits) <= values[-1]
    assert max(float(r["cumulative"]) for r in rows) > values[-1]  # the running sum is not drawn: not on the scale
    assert [t.text for t in attribution.find_elements("css selector", "text.xtick")][0] == "0"
    bar = attribution.find_element("css selector", "rect[data-component='mlp'][data-layer='20']")
    ActionChains(browser).move_to_element(bar).perform()
    row = next(r for r in rows if r["component"] == "mlp" and r["layer"] == "20")
    tip = browser.find_element("id", "tip").text
    assert f"MLP of block 20: {float(row['logit']):.3f}" in tip
    assert os.path.getsize(prompt_run / "report.png") > 10_000


@pytest.mark.parametrize("layer,pos", [("30", "16"), ("12", "13"), ("0", "0")])
def test_hovering_a_cell_shows_its_top_k_as_in_the_records_csv(browser, prompt_run, layer, pos):
    from selenium.webdriver import ActionChains

    _open(browser, prompt_run / f"output-{NAME}.html")
    records = _read_csv(prompt_run / f"output-{NAME}-records.csv")
    row = next(r for r in records if r["layer"] == layer and r["pos"] == pos)
    cell = browser.find_element("css selector", f"#heatmap td.cell[data-layer='{layer}'][data-pos='{pos}']")
    ActionChains(browser).move_to_element(cell).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed()
    shown = [(r.find_element("css selector", ".tok").text, float(r.find_element("css selector", ".prob").text))
             for r in tip.find_elements("css selector", "tr.tip-row")]
    expected = _top_k(row)
    assert [token for token, _ in shown] == [_shown(token) for token, _ in expected]
    for (_, shown_p), (_, p) in zip(shown, expected):
        assert shown_p == pytest.approx(p, rel=1e-3, abs=1e-12)
    assert f"entropy {float(row['entropy']):.4g}"[:12] in tip.find_element("css selector", ".entropy").text[:12]
    assert _js_errors(browser) == []


def test_pinning_a_token_shows_its_ranks_as_recomputed_from_the_csv(browser, prompt_run):
    _open(browser, prompt_run / f"output-{NAME}.html")
    pure = _read_csv(prompt_run / f"output-{NAME}-pure-next-token.csv")
    last = [c for c in browser.find_elements("css selector",
                                             "#heatmap td.cell") if c.get_attribute("data-pos") == "16"]
    # it opens on the probabilities (top-1 per cell); pinning the answer shows at the last
    # position its exact rank from the pure rows
    assert {c.get_attribute("data-rank") for c in last} == {""}
    assert browser.find_element("id", "pin-status").get_attribute("data-token") == ""
    browser.find_element("id", "pin-answer").click()
    assert {c.get_attribute("data-layer"): c.get_attribute("data-rank") for c in last} == \
        {r["layer"]: r["answer_rank"] for r in pure}
    box = browser.find_element("id", "pin-input")
    box.clear()
    box.send_keys(" Germany\n")
    expected = {}
    for row in _read_csv(prompt_run / f"output-{NAME}-records.csv"):
        tokens = [token for token, _ in _top_k(row)]
        expected[(row["layer"], row["pos"])] = str(tokens.index(" Germany") + 1) if " Germany" in tokens else ""
    shown = {(c.get_attribute("data-layer"), c.get_attribute("data-pos")): c.get_attribute("data-rank")
             for c in browser.find_elements("css selector", "#heatmap td.cell")}
    assert shown == expected and any(expected.values())
    assert browser.find_element("id", "pin-status").get_attribute("data-token") == " Germany"
    # a bare word follows the prompt as --answer does: "Berlin" is the answer's token " Berlin",
    # "Germany" after a word is " Germany"; a leading space is taken as typed
    for typed, pinned in (("Berlin", " Berlin"), ("Germany", " Germany"), (" the", " the")):
        box.clear()
        box.send_keys(typed + "\n")
        assert browser.find_element("id", "pin-status").get_attribute("data-token") == pinned
    assert _js_errors(browser) == []


def test_the_continuation_strip_colours_each_token_by_its_commit_layer_as_in_the_csv(browser, prompt_run):
    from selenium.webdriver import ActionChains

    _open(browser, prompt_run / f"output-{NAME}.html")
    rows, records = (_read_csv(prompt_run / f"output-{NAME}-{suffix}.csv")
                     for suffix in ("continuation", "continuation-records"))
    rows, records = [r for r in rows if r["lens"] == "final"], [r for r in records if r["lens"] == "final"]
    assert browser.find_element("id", "strip-lens").get_attribute("value") == "final"
    rules = (("top5", "first_top5_layer"), ("p_half", "first_p_over_half_layer"), ("commit", "commit_layer"))
    for rule, column in rules:
        browser.find_element("css selector", f"button[data-rule='{rule}']").click()
        spans = browser.find_elements("css selector", "#continuation-strip span.tok")
        assert [(s.get_attribute("data-pos"), s.get_attribute("data-layer")) for s in spans] == \
            [(r["pos"], r[column]) for r in rows]
    assert "".join(s.text for s in spans).strip() == "".join(r["token"] for r in rows).strip()
    token = rows[-1]
    span = spans[-1]
    ActionChains(browser).move_to_element(span).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed() and f"position {token['pos']}" in tip.text
    assert f"top-1 through the last layer: {token['commit_layer'] or 'never'}" in tip.text
    span.click()  # that position's column of the heatmap: every layer's top 5, the token marked at its rank
    column = browser.find_element("id", "continuation-column")
    assert column.get_attribute("data-pos") == token["pos"]
    own = {c.get_attribute("data-layer"): c.get_attribute("data-k")
           for c in column.find_elements("css selector", "td.own")}
    by_layer = {r["layer"]: r for r in records if r["pos"] == token["pos"]}
    assert own == {layer: r["rank"] for layer, r in by_layer.items() if int(r["rank"]) <= 5}
    for layer, k in own.items():  # the token's own probability, as in the records
        cell = column.find_element("css selector", f"td.own[data-layer='{layer}']")
        assert float(cell.text.split()[-1]) == pytest.approx(float(by_layer[layer]["p"]), rel=1e-3)
    assert len(column.find_elements("css selector", "tr")) == 31
    assert _js_errors(browser) == []


def test_a_battery_report_opens_with_a_working_prompt_table(browser, bundled_model_dir, tmp_path):
    out = tmp_path / "battery"
    lines = open(BATTERY, encoding="utf-8").read().splitlines()
    part = tmp_path / "part.jsonl"  # 30 facts, Japan among them: the whole battery took a minute
    part.write_text("\n".join(lines[:29] + [line for line in lines[29:] if '"Japan"' in line]) + "\n")
    subprocess.run([sys.executable, RUN_PY, "--prompts", str(part), "--out_dir", str(out), "--quiet"], check=True)
    _open(browser, out / f"output-{NAME}.html")
    summary = _read_csv(out / f"output-{NAME}-summary.csv")
    rows = browser.find_elements("css selector", "#prompt-table tbody tr.prompt")
    assert len(rows) == len(summary) == 30
    first = rows[0]
    for column in ("prompt_tokens", "L_semantic", "final_p_answer"):  # numbers are shown as numbers
        shown = first.find_element("css selector", f"td[data-column='{column}']").text
        assert shown == summary[0][column] or float(shown) == pytest.approx(float(summary[0][column]))
    browser.find_element("css selector", "#prompt-table th[data-column='final_p_answer']").click()
    ids = [r.get_attribute("data-prompt-id") for r in browser.find_elements("css selector",
                                                                            "#prompt-table tbody tr.prompt")]
    by_p = sorted(summary, key=lambda r: float(r["final_p_answer"]))
    assert ids == [r["prompt_id"] for r in by_p]
    browser.find_element("css selector", "#prompt-table tbody tr[data-prompt-id='Japan']").click()
    detail = browser.find_element("id", "detail")
    assert "Prompt Japan" in detail.text and len(detail.find_elements("css selector", "table.topk tr")) == 31
    assert len(browser.find_elements("css selector", "#milestones circle")) > 50
    assert "dtype: torch.float32" in browser.find_element("id", "provenance").text  # a set's page too
    for key in ("L_semantic", "first_rank_le_5"):  # how many reach each milestone at all
        reached = sum(bool(r[key]) for r in summary)
        label = browser.find_element("css selector", f"#milestones text.reached[data-key='{key}']").text
        assert label == f"{reached} / {len(summary)} reached"
    assert "p_sequence" in [th.get_attribute("data-column") for th in
                            browser.find_elements("css selector", "#prompt-table th")]
    assert all(0 < float(r["p_sequence"]) <= 1 for r in summary)
    assert _js_errors(browser) == []


def test_a_long_prompt_report_is_small_and_opens_fast(browser, bundled_model_dir, tmp_path):
    """30 layers × 200 positions: under 5 MB (nothing beside it) and drawn in under 2 s."""
    prompt = " ".join(["The capital of Germany is Berlin and the capital of France is Paris."] * 16)
    out = tmp_path / "long"
    subprocess.run([sys.executable, RUN_PY, "--out_dir", str(out), "--prompt", prompt, "--answer", "Berlin",
                    "--heatmap-window", "200", "--quiet"], check=True)
    page = out / f"output-{NAME}.html"
    assert len({row["pos"] for row in _read_csv(out / f"output-{NAME}-records.csv")}) > 200  # the window cuts
    assert os.path.getsize(page) < 5 * 2**20
    started = time.perf_counter()
    _open(browser, page)
    cells = browser.execute_script("return document.querySelectorAll('#heatmap td.cell').length")
    assert time.perf_counter() - started < 2.0
    assert cells == 31 * 200
    assert _js_errors(browser) == []


def test_the_report_renders_in_a_notebook(tiny_dirs, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    code = (f"import layers_core as lc\nlm = lc.load({tiny_dirs['llama']!r})\n"
            "s = lc.sweep(lm, 'The capital of Germany is called simply', 'Berlin')\ns")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[0].outputs
    html = next(o["data"]["text/html"] for o in outputs if o.get("output_type") == "execute_result")
    assert html.startswith("<iframe srcdoc=") and "report-data" in html and "Berlin" in html


def test_a_set_with_records_opens_each_prompts_heatmap(browser, tiny_dirs, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"id": "de", "prompt": "The capital of Germany is", "answer": "Berlin"}\n'
                     '{"id": "fr", "prompt": "The capital of France is called simply", "answer": "Paris"}\n')
    out = tmp_path / "set"
    subprocess.run([sys.executable, RUN_PY, tiny_dirs["llama"], "--prompts", str(facts), "--records",
                    "--out_dir", str(out), "--quiet"], check=True)
    _open(browser, out / "output-llama.html")
    records = _read_csv(out / "output-llama-records.csv")
    browser.find_element("css selector", "#prompt-table tbody tr[data-prompt-id='fr']").click()
    cells = browser.find_elements("css selector", "#detail #heatmap td.cell")
    own = [row for row in records if row["prompt_id"] == "fr"]
    assert len(cells) == len(own) == 4 * len({row["pos"] for row in own})  # 3 blocks + embeddings
    assert _js_errors(browser) == []


def test_a_sets_report_draws_each_curve_with_its_band(browser, tiny_dirs, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"id": en, "prompt": f"The word {en} in German is", "answer": de,
                                         "concepts": {"de": de, "en": en}}) + "\n"
                             for en, de in (("cat", "Katze"), ("dog", "Hund"), ("tree", "Baum"))))
    out = tmp_path / "set"
    subprocess.run([sys.executable, RUN_PY, tiny_dirs["llama"], "--prompts", str(facts), "--out_dir", str(out),
                    "--quiet"], check=True)
    _open(browser, out / "output-llama.html")
    curves = _read_csv(out / "output-llama-layers.csv")
    bands = browser.find_elements("css selector", "#layer-curves polygon[data-column]")
    means = browser.find_elements("css selector", "#layer-curves path[data-column]")
    assert [b.get_attribute("data-column") for b in bands] == ["p_answer", "de", "en", "entropy", "answer_rank",
                                                               "kl_to_final_bits"]
    assert [m.get_attribute("data-column") for m in means] == [b.get_attribute("data-column") for b in bands]
    layers = [row for row in curves if row["column"] == "de"]
    assert means[1].get_attribute("d").count("L") == len(layers) - 1 == 3  # one vertex per layer
    assert len(bands[1].get_attribute("points").split()) == 2 * len(layers)  # upper edge, then lower
    assert "de n=3" in browser.find_element("id", "layer-curves").text
    assert _js_errors(browser) == []


def test_a_comparison_of_models_has_a_panel_per_milestone(browser, tiny_dirs, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(open(BATTERY, encoding="utf-8").readlines()[:3]), encoding="utf-8")
    for family in ("llama", "gpt2"):
        subprocess.run([sys.executable, RUN_PY, tiny_dirs[family], "--prompts", str(facts), "--no-plots",
                        "--quiet",
                        "--out_dir", str(tmp_path / family)], check=True)
    subprocess.run([sys.executable, os.path.join(HERE, "merge.py"), str(tmp_path / "llama"),
                    str(tmp_path / "gpt2"),
                    "--out", str(tmp_path / "both")], check=True, capture_output=True)
    _open(browser, tmp_path / "both" / "comparison.html")
    from layers_core.results.merge import MILESTONES

    panels = browser.find_elements("css selector", "#comparison svg.chart")
    assert len(panels) == len(MILESTONES)
    rows = _read_csv(tmp_path / "both" / "comparison.csv")
    strips = browser.find_elements("css selector", "#milestones text.reached")  # one per model, not pooled
    models = {row["model"] for row in rows}
    assert len(models) == 2 and {s.get_attribute("data-model") for s in strips} == models
    assert len(strips) == 2 * len({s.get_attribute("data-key") for s in strips}) >= 12
    for strip in strips:
        key, model = strip.get_attribute("data-key"), strip.get_attribute("data-model")
        mine = [row for row in rows if row["model"] == model]
        assert strip.text == f"{sum(bool(row[key]) for row in mine)} / {len(mine)} reached"
    assert len(browser.find_elements("css selector", "#prompt-table tbody tr.prompt")) == 6
    assert _js_errors(browser) == []


def test_sublayers_are_half_steps_in_the_heatmap(browser, tiny_dirs, tmp_path):
    out = tmp_path / "sub"
    subprocess.run([sys.executable, RUN_PY, tiny_dirs["llama"], "--sublayers", "--out_dir", str(out), "--quiet"],
                   check=True)
    _open(browser, out / "output-llama.html")
    records = _read_csv(out / "output-llama-records.csv")
    cells = browser.find_elements("css selector", "#heatmap td.cell")
    assert len(cells) == len(records) == 7 * len({row["pos"] for row in records})  # 3 blocks: 2·3 + 1 reads
    labels = list(dict.fromkeys(c.get_attribute("data-layer") for c in cells))
    assert labels == ["3", "2½", "2", "1½", "1", "0½", "0"]  # top to bottom: the attn read of block b is b½
    assert _js_errors(browser) == []


def test_every_lens_is_plotted_by_layer_when_some_have_half_steps(browser, tiny_dirs, tmp_path):
    """With --sublayers the chosen lens has 2n+1 rows and the comparison lens n+1: plotted by row
    index, the comparison's lines were squeezed into the left half (its last layer near n/2)."""
    import re

    out = tmp_path / "sub"
    subprocess.run([sys.executable, RUN_PY, tiny_dirs["llama"], "--sublayers", "--compare-lenses", "--out_dir",
                    str(out), "--quiet"], check=True)
    _open(browser, out / "output-llama.html")
    charts = [chart for chart in browser.find_elements("css selector", "svg.chart")
              if chart.find_elements("css selector", "path[data-lens]")]  # the line charts, not the bars
    assert len(charts) == 4
    for chart in charts:
        ends = {}
        for path in chart.find_elements("css selector", "path[data-lens]"):
            xs = [float(x) for x in re.findall(r"[ML]([\d.]+) ", path.get_attribute("d"))]
            if xs:
                ends[path.get_attribute("data-lens")] = (min(xs), max(xs), len(xs))
        assert {"final", "arch"} <= set(ends)
        assert len({round(first, 1) for first, _, _ in ends.values()}) == 1  # layer 0 at one x
        assert len({round(last, 1) for _, last, _ in ends.values()}) == 1  # the last layer at one x
        assert ends["final"][2] == 7 and ends["arch"][2] == 4  # half-steps only where they exist
    assert _js_errors(browser) == []
