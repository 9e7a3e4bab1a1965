"""Trust, round 4 (#31): nothing non-finite passes as a number, and a run knows what it ran on.
Each test is a case of the round-4 review and fails on the code before it."""

import json
import math

import pytest
import run
import torch

import layers_core as lc
from conftest import assert_clean_failure
from layers_core.collapse_rules import compute_milestones, semantic_milestones, summarize_collapse
from layers_core.lens.stats import lens_statistics, stats_from_log_probs
from layers_core.lens.tuned import TunedLens
from layers_core.lens.unembed import Unembedding

PROMPT = "The capital of Germany is"


def _zero_lens(bridge):
    n, d = int(bridge.cfg.n_layers), int(bridge.cfg.d_model)
    return TunedLens(torch.zeros(n, d, d), torch.zeros(n, d))


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_a_tuned_lens_with_a_nan_or_inf_fails_in_one_line_naming_file_and_layer(
        poison, load_bridge, tiny_dirs, tmp_path, capsys):
    """One NaN in params.pt['1.weight'][3, 5] gave ✅, L_semantic 1 and first_rank_le_1 1; an inf
    bias gave L_semantic 0."""
    lens = _zero_lens(load_bridge("llama"))
    if math.isnan(poison):
        lens.weights[1, 3, 5] = poison
    else:
        lens.biases[0, 2] = poison
    lens.save(str(tmp_path / "lens"))
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--lens", "tuned", "--lens-path",
                     str(tmp_path / "lens"), "--allow-foreign-lens", "--out_dir", str(tmp_path / "out"),
                     "--quiet", "--no-plots"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    layer = 1 if math.isnan(poison) else 0
    assert (f"the tuned lens ({tmp_path / 'lens'}) produced non-finite values (inf/NaN) at layer {layer}"
            in captured.err)
    assert not (tmp_path / "out" / "output-llama.json").exists()
    assert json.loads((tmp_path / "out" / "output-llama.error.json").read_text())["error"]["stage"] == "lens"


def test_a_nan_lens_fails_a_prompt_set_instead_of_giving_every_prompt_l_semantic_1(
        load_bridge, tiny_dirs, tmp_path, capsys):
    lens = _zero_lens(load_bridge("llama"))
    lens.weights[1, 3, 5] = math.nan
    lens.save(str(tmp_path / "lens"))
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps({"prompt": f"Fact {i} is", "answer": "x"}) for i in range(5)) + "\n")
    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", str(facts), "--lens", "tuned",
                     "--lens-path", str(tmp_path / "lens"), "--allow-foreign-lens",
                     "--out_dir", str(tmp_path / "out"), "--quiet", "--no-plots"])
    captured = capsys.readouterr()
    assert_clean_failure(captured, code, 1)
    assert "non-finite values (inf/NaN) at layer 1" in captured.err


class _PoisonLens:
    """A user's lens with a bug: layer 2 comes out NaN."""

    name = "poison"

    def transform(self, residual, layer):
        return residual * math.nan if layer == 2 else residual


def test_a_users_lens_that_makes_nan_is_refused_by_the_api(load_bridge):
    lm = lc.load(load_bridge("llama"))
    with pytest.raises(ValueError, match="the poison lens produced non-finite values .* at layer 2"):
        lc.sweep(lm, PROMPT, "Berlin", lens=_PoisonLens(), control=False)


# ---- a NaN row never ranks or counts toward a milestone, metric by metric -------------------------

@pytest.fixture(scope="module")
def nan_stats():
    """Three layers of log-probs over 6 tokens: layer 1 all NaN, layer 2 NaN but for the answer."""
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 9, 0]])
    log_probs = torch.log_softmax(logits, dim=-1)
    log_probs[1] = math.nan
    log_probs[2, :4] = math.nan
    final = torch.log_softmax(torch.tensor([0.0, 0, 0, 0, 9, 0]), dim=-1)
    return stats_from_log_probs(log_probs, final, answer_id=4, top_k=2)


def test_the_answer_rank_of_a_nan_row_is_last(nan_stats):
    """NaN logits made every comparison false: the answer ranked 1."""
    assert nan_stats.answer_rank.tolist() == [2, 7, 5]  # layer 2: four NaN tokens count as ahead


def test_lens_statistics_rank_nan_rows_last():
    unembed = Unembedding(torch.eye(4), None, lambda logits: logits)
    rows = [torch.tensor([[0.0, 0, 5, 0]]), torch.tensor([[math.nan, 0, 0, 0]])]
    stats = lens_statistics(rows, unembed, torch.log_softmax(torch.tensor([0.0, 0, 5, 0]), -1), answer_id=2,
                            top_k=2)
    assert stats.answer_rank.tolist() == [1, 5]


def _pure_rows(nan_stats):
    rows = []
    for layer in range(3):
        p1, p2 = nan_stats.topk_probs[layer, 0].tolist()
        rows.append({"layer": layer, "answer_rank": int(nan_stats.answer_rank[layer]),
                     "p_answer": float(nan_stats.p_answer[layer, 0]), "prob1": p1, "prob2": p2,
                     "kl_to_final_bits": float(nan_stats.kl_to_final_bits[layer]),
                     "entropy": float(nan_stats.entropy_bits[layer, 0]),
                     "is_answer": int(nan_stats.answer_rank[layer]) == 1,
                     "copy_collapse": p1 > 0.95 and p1 - p2 > 0.1, "entropy_collapse": nan_stats.entropy_bits[
                         layer, 0].item() < 1.0})
    return rows


def test_no_milestone_counts_a_nan_row(nan_stats):
    rows = _pure_rows(nan_stats)
    collapse = summarize_collapse(rows)
    assert collapse["L_semantic"] is None and collapse["L_copy"] is None and collapse["L_copy_H"] is None
    milestones = compute_milestones(rows)
    assert milestones["first_rank_le_1"] is None and milestones["first_rank_le_5"] == 0  # layer 0, rank 2
    assert milestones["first_kl_below_0.5"] is None and milestones["first_kl_below_1.0"] is None
    assert semantic_milestones(rows) == {"L_semantic_stable": None, "L_semantic_margin": None}


# ---- the last-layer check runs through the chosen lens ---------------------------------------------

class _LastLayerShift:
    """A user's lens that changes only the last layer (a reviewer's case: KL 32 bits there)."""

    name = "shifted"

    def __init__(self, n_layers):
        self.n_layers = n_layers

    def transform(self, residual, layer):
        return residual.flip(-1) if layer == self.n_layers else residual


def test_a_lens_that_changes_the_last_layer_fails_the_check_and_says_so(load_bridge):
    """It showed ``passed`` with KL 0.0: the check decoded through ln_final, not the chosen lens."""
    lm = lc.load(load_bridge("llama"))
    s = lc.sweep(lm, PROMPT, "Berlin", lens=_LastLayerShift(lm.n_layers), control=False)
    check = s.diagnostics["last_layer_consistency"]
    assert check["lens"] == "shifted" and check["passed"] is False
    assert check["kl_model_to_lens_bits"] > 0.01
    assert check["pipeline_passed"] is True and check["pipeline_kl_bits"] <= 1e-6
    plain = lc.sweep(lm, PROMPT, "Berlin", control=False).diagnostics["last_layer_consistency"]
    assert plain["passed"] and plain["lens"] == "final"
    assert plain["kl_model_to_lens_bits"] == plain["pipeline_kl_bits"]


def test_a_run_under_the_raw_lens_warns_that_its_last_layer_is_not_the_models(tiny_dirs, tmp_path, capsys):
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--norm", "none", "--out_dir", str(tmp_path),
                     "--quiet", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "the none lens does not reproduce the model at the last layer" in err
    check = json.loads((tmp_path / "output-llama.json").read_text())["diagnostics"]["last_layer_consistency"]
    assert check["passed"] is False and check["pipeline_passed"] is True
