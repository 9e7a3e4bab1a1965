"""Per-layer curves over a set: the mean and bootstrap band per layer (and group), checked against
a direct pandas computation; the set's files (``layers.csv``), the figure and a merge of shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import layers_core as lc
from conftest import HERE
from layers_core.pipeline.sweep import SweepSettings
from layers_core.results.curves import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, layer_curves

PAIRS = [("book", "livre", "Buch"), ("dog", "chien", "Hund"), ("house", "maison", "Haus"),
         ("water", "eau", "Wasser"), ("city", "ville", "Stadt"), ("child", "enfant", "Kind")]
TEMPLATE = 'Français: "{source}" - Deutsch: "{target}"'


def _values():
    """5 prompts × 4 layers: 'x' everywhere, 'y' missing for prompt c (left out of its curve)."""
    rng = np.random.default_rng(7)
    rows = [{"prompt_id": pid, "layer": layer, "x": float(rng.normal()), "y": None if pid == "c" else layer * 0.1}
            for pid in "abcde" for layer in range(4)]
    prompts = pd.DataFrame({"prompt_id": list("abcde"), "kind": ["u", "v", "u", "v", "u"]})
    return pd.DataFrame(rows), prompts


def _direct(values, column, ci):
    """The documented procedure written out with pandas: mean per layer; the band from the
    prompts resampled by default_rng(0).integers(0, n, size=(1000, n))."""
    wide = values.pivot(index="prompt_id", columns="layer", values=column).dropna()
    n = len(wide)
    picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    means = np.stack([wide.to_numpy()[pick].mean(axis=0) for pick in picks])
    low, high = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    return values.dropna(subset=[column]).groupby("layer")[column].mean(), low, high, n


@pytest.mark.parametrize("ci", [0.95, 0.5])
def test_layer_curves_equal_a_direct_pandas_computation(ci):
    values, _ = _values()
    curves = layer_curves(values, ["x", "y"], ci=ci)
    assert curves.columns.tolist() == ["column", "layer", "mean", "ci_low", "ci_high", "n"]
    for column in ("x", "y"):
        mean, low, high, n = _direct(values, column, ci)
        own = curves[curves.column == column]
        assert own.layer.tolist() == [0, 1, 2, 3] and set(own.n) == {n}
        np.testing.assert_allclose(own["mean"], mean.to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(own["ci_low"], low, rtol=1e-12)
        np.testing.assert_allclose(own["ci_high"], high, rtol=1e-12)
    assert set(curves[curves.column == "y"].n) == {4}  # prompt c has no y


def test_grouped_curves_equal_the_curves_of_each_group_alone():
    values, prompts = _values()
    grouped = layer_curves(values, ["x"], prompts, by="kind")
    for kind, members in prompts.groupby("kind"):
        alone = layer_curves(values[values.prompt_id.isin(members.prompt_id)], ["x"])
        mine = grouped[grouped.kind == kind].drop(columns="kind").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone)
    with pytest.raises(ValueError, match="no column 'z'"):
        layer_curves(values, ["z"])
    with pytest.raises(ValueError, match="no prompt field 'pair'"):
        layer_curves(values, ["x"], prompts, by="pair")
    with pytest.raises(ValueError, match="ci must be between"):
        layer_curves(values, ["x"], ci=1.0)


def _items():
    shots = [("jardin", "Garten"), ("vent", "Wind")]
    return [{"id": en, "prompt": lc.few_shot(shots, fr, TEMPLATE), "answer": de,
             "concepts": {"de": de, "en": en}, "meta": {"half": index % 2, "en": en}}
            for index, (en, fr, de) in enumerate(PAIRS)]


@pytest.fixture(scope="module")
def bundled_set(bundled_model_dir):
    lm = lc.load(bundled_model_dir, device="cpu", dtype="float32")
    return lc.sweep_set(lm, _items())


def test_a_sets_curves_are_the_mean_of_its_own_tables(bundled_set):
    curves = bundled_set.layer_curves(["entropy", "p_answer", "de", "en"], by="half")
    concepts = bundled_set.concepts[bundled_set.concepts.lens == "final"]
    half = dict(zip(bundled_set.summary.prompt_id, bundled_set.summary.half))
    concepts = concepts.assign(half=concepts.prompt_id.map(half))
    for (group, concept), part in concepts.groupby(["half", "concept"]):
        expected = part.groupby("layer").p.mean()
        mine = curves[(curves.half == group) & (curves.column == concept)]
        np.testing.assert_allclose(mine["mean"], expected.to_numpy(), rtol=1e-9)
        assert (mine.ci_low <= mine["mean"] + 1e-15).all() and (mine["mean"] <= mine.ci_high + 1e-15).all()
    pure = pd.concat([pd.DataFrame(o.pure).assign(half=half[o.prompt_id]) for o in bundled_set.outcomes])
    for group, part in pure.groupby("half"):
        mine = curves[(curves.half == group) & (curves.column == "entropy")]
        np.testing.assert_allclose(mine["mean"], part.groupby("layer").entropy.mean().to_numpy(), rtol=1e-6)
    fig = bundled_set.layers_figure(["de", "en", "entropy"], by="half")
    assert len(fig.axes) == 2 * 2  # probabilities and entropy, a column per group
    assert fig.axes[0].get_title() == "half=0" and len(fig.axes[0].collections) == 2  # two bands


def test_the_set_files_hold_the_curves_the_set_computes(bundled_set, tmp_path):
    paths = bundled_set.save(str(tmp_path), plots=True)
    written = pd.read_csv(paths["layers"])
    expected = bundled_set.layer_curves()
    assert written.column.unique().tolist() == ["entropy", "p_answer", "answer_rank", "kl_to_final_bits", "de",
                                                "en"]
    np.testing.assert_allclose(written[["mean", "ci_low", "ci_high"]], expected[["mean", "ci_low", "ci_high"]],
                               rtol=1e-6)
    assert os.path.getsize(paths["layers_png"]) > 10_000
    page = open(paths["html"], encoding="utf-8").read()
    assert '"layer_curves"' in page and '"de"' in page


def test_merged_shards_recompute_the_unsharded_curves(tiny_dirs, tmp_path):
    import run

    facts = tmp_path / "facts.jsonl"
    words = [("cat", "Katze"), ("dog", "Hund"), ("tree", "Baum"), ("house", "Haus"), ("book", "Buch")]
    facts.write_text("".join(json.dumps({"id": en, "prompt": f"The word {en} in German is", "answer": de,
                                         "concepts": {"de": de, "en": en}, "meta": {"k": i % 2}}) + "\n"
                             for i, (en, de) in enumerate(words)))
    base = ["--device", "cpu", tiny_dirs["llama"], "--prompts", str(facts), "--quiet", "--no-plots",
            "--batch-size", "2"]
    assert run.main([*base, "--out_dir", str(tmp_path / "whole")]) == 0
    for k in range(2):
        assert run.main([*base, "--shard", f"{k}/2", "--out_dir", str(tmp_path / f"shard{k}")]) == 0
    done = subprocess.run([sys.executable, os.path.join(HERE, "merge.py"), str(tmp_path / "shard0"),
                           str(tmp_path / "shard1"), "--out", str(tmp_path / "merged"), "--no-plots"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = pd.read_csv(tmp_path / "whole" / "output-llama-layers.csv")
    merged = pd.read_csv(tmp_path / "merged" / "output-llama-layers.csv")
    assert merged[["column", "layer", "n"]].equals(whole[["column", "layer", "n"]])
    np.testing.assert_allclose(merged[["mean", "ci_low", "ci_high"]], whole[["mean", "ci_low", "ci_high"]],
                               rtol=1e-5, atol=1e-9)
    concepts = pd.read_csv(tmp_path / "merged" / "output-llama-concepts.csv")
    assert concepts.prompt_id.unique().tolist() == [en for en, _ in words]
    assert set(merged.column) >= {"de", "en"}


def test_the_default_columns_skip_an_answerless_set(tiny_dirs):
    lm = lc.load(tiny_dirs["llama"], device="cpu", dtype="float32")
    ss = lc.sweep_set(lm, [{"prompt": "one two", "answer": "three"}],
                      settings=SweepSettings(concepts={"a": "the"}))
    assert ss.layer_curves().column.unique().tolist() == ["entropy", "p_answer", "answer_rank", "kl_to_final_bits",
                                                          "a"]
    unresolved = lc.sweep_set(lm, [{"prompt": "one two", "answer": "three"}],
                              settings=SweepSettings(concepts={"a": "the"}, answer_join="none"))
    if unresolved.summary.gold_status[0] != "ok":  # no answer: its curves are left out, not drawn as NaN
        assert unresolved.layer_curves().column.unique().tolist() == ["entropy", "kl_to_final_bits", "a"]
