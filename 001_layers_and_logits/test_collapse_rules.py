"""collapse_rules: copy/entropy/semantic rules, gold-answer alignment, summaries."""

import pytest
import torch

from layers_core.collapse_rules import (
    COPY_MARGIN,
    COPY_THRESHOLD,
    answer_token_ids,
    compute_milestones,
    detect_copy_collapse,
    is_entropy_collapse,
    is_semantic_top1,
    resolve_gold_answer,
    summarize_collapse,
)


def test_copy_collapse_threshold_and_margin():
    logits = torch.tensor([0.1, 0.2, 5.0, -1.0, 0.0])
    assert detect_copy_collapse(logits, {2, 4}, copy_threshold=0.6, copy_margin=0.2)
    assert not detect_copy_collapse(logits, {4}, copy_threshold=0.6, copy_margin=0.2)


def test_entropy_fallback_on_and_off():
    logits = torch.tensor([3.0, 2.9, -5.0, -5.0])
    kwargs = dict(copy_threshold=0.99, copy_margin=0.5, entropy_bits=0.5)
    assert detect_copy_collapse(logits, {0}, **kwargs)
    assert not detect_copy_collapse(logits, {0}, use_entropy_fallback=False, **kwargs)


def test_p1_equal_to_threshold_is_not_copy():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert not detect_copy_collapse(logits, {0}, copy_threshold=0.5, copy_margin=0.1,
                                    use_entropy_fallback=False)


def test_entropy_exactly_one_bit_collapses_but_no_fallback():
    assert is_entropy_collapse(1.0)
    logits = torch.tensor([0.0, 0.0])  # exactly 1 bit, top-1 not confident
    assert not detect_copy_collapse(logits, {0}, entropy_bits=1.0)


def test_defaults_are_the_legacy_rule():
    assert (COPY_THRESHOLD, COPY_MARGIN) == (0.90, 0.05)


@pytest.mark.parametrize("text,ok", [("Berlin", True), (" Berlin\n", True), ("Ber", False)])
def test_semantic_string_fallback(text, ok):
    assert is_semantic_top1(text, "Berlin") is ok


class TableTokenizer:
    """A fake tokenizer: a fixed text → ids table, so each alignment case is explicit."""

    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": self.table[text]}

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


PROMPT = "The capital is"


def test_gold_with_space():
    tok = TableTokenizer({PROMPT: [1, 2, 3], f"{PROMPT} Berlin": [1, 2, 3, 40, 41]})
    gold = resolve_gold_answer(tok, PROMPT, "Berlin")
    assert gold == {"string": "Berlin", "pieces": ["t40", "t41"], "first_id": 40,
                    "answer_ids": [40, 41], "variant": "with_space", "ok": True, "status": "ok",
                    "warnings": [], "first_ids": [40], "aliases": []}


def test_gold_no_space_when_the_space_variant_changes_the_prompt_ids():
    tok = TableTokenizer({PROMPT: [1, 2, 3], f"{PROMPT} Berlin": [1, 2, 99],
                          f"{PROMPT}Berlin": [1, 2, 3, 50]})
    gold = resolve_gold_answer(tok, PROMPT, "Berlin")
    assert (gold["variant"], gold["first_id"], gold["answer_ids"]) == ("no_space", 50, [50])


def test_gold_unresolved_when_both_variants_change_the_prompt_ids():
    tok = TableTokenizer({PROMPT: [1, 2, 3], f"{PROMPT} Berlin": [1, 2, 99],
                          f"{PROMPT}Berlin": [1, 7, 3, 50]})
    gold = resolve_gold_answer(tok, PROMPT, "Berlin")
    assert gold == {"string": "Berlin", "pieces": [], "first_id": None, "answer_ids": [],
                    "variant": "unknown", "ok": False, "status": "unresolved",
                    "warnings": [], "first_ids": [], "aliases": []}


def test_gold_prefix_check_is_mandatory_even_when_longer():
    """A longer id list whose head differs from the prompt's is not an answer continuation."""
    tok = TableTokenizer({PROMPT: [1, 2, 3], f"{PROMPT} Berlin": [9, 9, 9, 9],
                          f"{PROMPT}Berlin": [9, 9, 9, 9, 9]})
    assert resolve_gold_answer(tok, PROMPT, "Berlin")["status"] == "unresolved"


def test_gold_pieces_are_every_piece_of_the_answer():
    tok = TableTokenizer({PROMPT: [1], f"{PROMPT} Berlin": [1, 2, 3, 4, 5, 6]})
    gold = resolve_gold_answer(tok, PROMPT, "Berlin")
    assert gold["pieces"] == ["t2", "t3", "t4", "t5", "t6"] and gold["answer_ids"] == [2, 3, 4, 5, 6]


def test_gold_on_the_bundled_tokenizer(bundled_bridge):
    gold = resolve_gold_answer(bundled_bridge.tokenizer,
                               "Give the city name only, plain text. The capital of Germany is "
                               "called simply", "Berlin")
    assert (gold["variant"], gold["first_id"], gold["answer_ids"]) == ("with_space", 11452, [11452])


def _pure(layer, copy=False, strict=False, ent=False, ans=False, rank=None, kl=None, prompt=None):
    return {"layer": layer, "copy_collapse": copy, "copy_strict": strict, "entropy_collapse": ent,
            "is_answer": ans, "answer_rank": rank, "kl_to_final_bits": kl,
            "copy_collapse_prompt": copy if prompt is None else prompt}


def test_summary_with_negative_delta_and_nulls():
    rows = [_pure(0), _pure(1, ans=True, rank=1), _pure(2, copy=True, ent=True), _pure(3)]
    assert summarize_collapse(rows) == {"L_copy": 2, "L_copy_strict": None, "L_copy_H": 2,
                                        "L_semantic": 1, "delta_layers": -1, "L_copy_prompt": 2}
    empty = summarize_collapse([_pure(0), _pure(1)])
    assert empty["L_copy"] is None and empty["delta_layers"] is None


def test_milestones_first_layers_and_nulls():
    rows = [_pure(0, rank=50, kl=3.0), _pure(1, rank=7, kl=1.0), _pure(2, rank=5, kl=0.6),
            _pure(3, rank=1, kl=0.0)]
    assert compute_milestones(rows) == {"first_rank_le_1": 3, "first_rank_le_5": 2,
                                        "first_rank_le_10": 1, "first_kl_below_0.5": 3,
                                        "first_kl_below_1.0": 1}
    unresolved = compute_milestones([_pure(0, kl=2.0)])
    assert unresolved["first_rank_le_1"] is None and unresolved["first_kl_below_0.5"] is None


def test_tied_embeddings_exclude_layer_0_from_copy_collapse():
    """With tied embeddings layer 0 decodes to the input token itself: not a copy by the model."""
    rows = [_pure(0, copy=True, strict=True), _pure(1), _pure(2, copy=True, strict=True), _pure(3, ans=True)]
    assert summarize_collapse(rows)["L_copy"] == 0
    tied = summarize_collapse(rows, skip_layer0_copy=True)
    assert (tied["L_copy"], tied["L_copy_strict"], tied["L_copy_prompt"], tied["delta_layers"]) == (2, 2, 2, 1)


def test_copy_collapse_prompt_requires_a_prompt_token():
    """The seed's entropy fallback fires on any confident top-1; the _prompt variant does not."""
    import torch

    from layers_core.collapse_rules import copy_collapse_flags

    top1 = torch.tensor([4, 9, 4])
    p1, p2 = torch.tensor([0.95, 0.98, 0.5]), torch.tensor([0.01, 0.01, 0.4])
    entropy = torch.tensor([0.3, 0.2, 3.0])
    copy, strict, copy_prompt = copy_collapse_flags(top1, p1, p2, entropy, [4, 5])
    assert copy.tolist() == [True, True, False]  # id 9 is not in the prompt: fallback only
    assert strict.tolist() == [True, False, False]
    assert copy_prompt.tolist() == [True, False, False]


def test_ambiguous_first_pieces():
    from layers_core.collapse_rules import ambiguous_first_pieces

    golds = [{"first_id": 7, "answer_ids": [7, 8]}, {"first_id": 7, "answer_ids": [7]},
             {"first_id": 9, "answer_ids": [9, 3]}, {"first_id": None, "answer_ids": []}]
    assert ambiguous_first_pieces(golds) == [True, False, False, False]


def test_aliases_resolve_each_and_follow_every_distinct_first_id():
    tok = TableTokenizer({PROMPT: [1, 2, 3], f"{PROMPT} Berlin": [1, 2, 3, 40, 41], f"{PROMPT} Bln": [1, 2, 3, 40],
                          f"{PROMPT} Berolina": [1, 2, 3, 60], f"{PROMPT}Berlin": [9], f"{PROMPT}Bln": [9],
                          f"{PROMPT}Berolina": [9], f"{PROMPT} Xx": [7], f"{PROMPT}Xx": [7]})
    gold = resolve_gold_answer(tok, PROMPT, ["Berlin", "Xx", "Bln", "Berolina"])
    assert (gold["string"], gold["answer_ids"], gold["first_ids"]) == ("Berlin", [40, 41], [40, 60])
    assert [alias["ok"] for alias in gold["aliases"]] == [True, False, True, True]
    assert answer_token_ids(gold) == [40, 60] and answer_token_ids(resolve_gold_answer(tok, PROMPT, "Bln")) == 40
    none = resolve_gold_answer(tok, PROMPT, ["Xx"])
    assert none["status"] == "unresolved" and answer_token_ids(none) is None and len(none["aliases"]) == 1
    with pytest.raises(ValueError, match="aliases"):
        resolve_gold_answer(tok, PROMPT, ["Berlin", " "])
