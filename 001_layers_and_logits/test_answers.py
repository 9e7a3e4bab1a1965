"""Answers as the model writes them (#32): the joining of answer to prompt, chosen by the prompt's
end or named per call and per item, and the same p_sequence batched or not, for every joining."""

import json

import pandas as pd
import pytest
import run

import layers_core as lc
from layers_core.collapse_rules import answer_join, resolve_gold_answer
from layers_core.results.prompt_sets import parse_prompt_set
from layers_core.results.set_files import read_prompt_entries

QUOTE = 'Français: "chat" - Deutsch: "Katze" - Français: "livre" - Deutsch: "'


@pytest.mark.parametrize("prompt,join", [
    (QUOTE, "none"), ("He said (", "none"), ("Answer:\n", "none"), ("The capital is ", "none"),
    ("日本の首都は", "none"), ("首都は「", "none"), ("เมืองหลวงคือ", "none"),
    ("The capital of France is", "space"), ("It is 42", "space"), ("Wait.", "space"),
    ('He said "yes"', "space"), ("x = '", "none"), ("Question: what is it?", "space"),
    ("", "none"),
])
def test_auto_joins_by_the_prompts_last_character(prompt, join):
    assert answer_join(prompt) == join
    assert answer_join(prompt, "space") == "space" and answer_join(prompt, "none") == "none"


def test_an_unknown_joining_is_refused():
    with pytest.raises(ValueError, match="answer_join must be one of auto, space, none"):
        answer_join("x", "spaces")


@pytest.fixture(scope="module")
def bundled(bundled_model_dir):
    return lc.load(bundled_model_dir, device="cpu")


def test_a_quote_ending_prompt_scores_the_word_as_the_model_writes_it(bundled):
    """It scored '▁Buch'/'ĠBuch' (p_sequence 3.5e-5) while the model writes 'Buch' (0.129)."""
    lm = bundled
    tokenizer = lm.bridge.tokenizer
    gold = resolve_gold_answer(tokenizer, QUOTE, "Buch")
    assert gold["variant"] == "no_space" and not gold["pieces"][0].startswith("Ġ")
    spaced = resolve_gold_answer(tokenizer, QUOTE, "Buch", join="space")
    assert spaced["variant"] == "with_space" and spaced["pieces"][0].startswith("Ġ")
    auto = lc.sweep(lm, QUOTE, "Buch", control=False)
    forced = lc.sweep(lm, QUOTE, "Buch", control=False, settings=lc.SweepSettings(answer_join="space"))
    p_auto, p_forced = auto.document["gold_answer"]["p_sequence"], forced.document["gold_answer"]["p_sequence"]
    assert p_auto > 10 * p_forced  # the model writes it without the space (26× on SmolLM2)
    assert auto.diagnostics["gold_alignment"]["variant"] == "no_space"


FACTS = [{"id": "quote", "prompt": QUOTE, "answer": "Buch"},
         {"id": "word", "prompt": "The capital of Germany is", "answer": "Berlin"},
         {"id": "space", "prompt": "The capital of France is ", "answer": "Paris"},
         {"id": "forced", "prompt": "The capital of Italy is", "answer": "Rome", "answer_join": "none"}]


@pytest.mark.parametrize("join,chat", [("auto", False), ("space", False), ("none", False), ("auto", True),
                                       ("none", True)])  # chat on the bundled model: 4.5 s each
def test_batched_and_unbatched_sets_agree_on_p_sequence_for_every_joining(bundled, load_bridge, join, chat):
    """With chat=True, batched sweep_set reported the with-space p_sequence (3.47e-5 next to the
    tokens ['Buch']) while batch_size=1 gave 0.1287. (The tiny Llama has no chat template.)"""
    lm = bundled if chat else lc.load(load_bridge("llama"))
    results = {}
    for batch in (1, 4):
        settings = lc.SweepSettings(answer_join=join, chat=chat, batch_size=batch)
        results[batch] = {e["prompt_id"]: e for e in lc.sweep_set(lm, FACTS, settings=settings).entries}
    for prompt_id, one in results[1].items():
        many = results[4][prompt_id]
        assert many["gold_answer"]["pieces"] == one["gold_answer"]["pieces"], prompt_id
        assert many["gold_answer"]["p_sequence"] == pytest.approx(one["gold_answer"]["p_sequence"], rel=1e-4)
    if join == "auto" and not chat:
        assert results[1]["quote"]["diagnostics"]["gold_alignment"]["variant"] == "no_space"
        assert results[1]["forced"]["diagnostics"]["gold_alignment"]["variant"] == "no_space"  # the item's own
        assert results[1]["word"]["diagnostics"]["gold_alignment"]["variant"] == "with_space"


def test_the_command_line_and_a_set_item_name_the_joining(tiny_dirs, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(f) for f in FACTS) + "\n")
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--prompts", str(facts), "--out_dir",
                     str(tmp_path / "a"), "--quiet", "--no-plots", "--answer-join", "space"]) == 0
    entries = {e["prompt_id"]: e for e in read_prompt_entries(tmp_path / "a" / "output-llama-prompts.jsonl")}
    variants = {pid: e["diagnostics"]["gold_alignment"]["variant"] for pid, e in entries.items()}
    assert variants["quote"] == "with_space" and variants["forced"] == "no_space"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "y", "answer_join": "both"}) + "\n")
    with pytest.raises(ValueError, match="'answer_join' must be one of auto, space, none, got 'both'"):
        lc.sweep_set(lc.load(tiny_dirs["llama"], device="cpu"), [json.loads(bad.read_text())])


CITY = "The largest city in the United States is"


def test_aliases_sum_their_probability_and_take_the_best_rank(bundled):
    alone = {alias: lc.sweep(bundled, CITY, alias, control=False) for alias in ("New York", "NYC")}
    both = lc.sweep(bundled, CITY, ["New York", "NYC"], control=False)
    summed = alone["New York"].pure.p_answer + alone["NYC"].pure.p_answer
    assert both.pure.p_answer.tolist() == pytest.approx(summed.tolist(), rel=1e-4, abs=1e-9)
    best = pd.concat([alone[a].pure.answer_rank for a in alone], axis=1).min(axis=1)
    assert both.pure.answer_rank.tolist() == best.tolist()  # the best alias's rank at every layer
    gold = both.document["gold_answer"]
    p_alone = {a: s.document["gold_answer"]["p_sequence"] for a, s in alone.items()}
    assert gold["p_sequence"] == pytest.approx(sum(p_alone.values()), rel=1e-4)
    assert [alias["string"] for alias in gold["aliases"]] == ["New York", "NYC"]
    assert [alias["p_sequence"] for alias in gold["aliases"]] == pytest.approx(list(p_alone.values()), rel=1e-4)
    assert gold["best_alias"] == max(p_alone, key=p_alone.get) and gold["variant"] == "with_space"
    assert gold["first_ids"] == [alias["first_id"] for alias in gold["aliases"]]
    milestones = both.diagnostics["milestones"]
    first = [row.layer for row in both.pure.itertuples() if row.answer_rank == 1]
    assert milestones["first_rank_le_1"] == (first[0] if first else None)


def test_aliases_in_a_set_batched_equal_unbatched_and_the_cli_takes_them(bundled, tiny_dirs, tmp_path):
    facts = [{"id": "city", "prompt": CITY, "answer": ["New York", "NYC", "New York City"]},
             {"id": "quote", "prompt": QUOTE, "answer": ["Buch", "Bücher"]}]
    one, many = (lc.sweep_set(bundled, facts, settings=lc.SweepSettings(batch_size=b)) for b in (1, 2))
    for a, b in zip(one.entries, many.entries):
        assert a["gold_answer"]["p_sequence"] == pytest.approx(b["gold_answer"]["p_sequence"], rel=1e-4)
        assert a["gold_answer"]["best_alias"] == b["gold_answer"]["best_alias"]
    assert one.summary.answer.tolist() == ["New York | NYC | New York City", "Buch | Bücher"]
    with pytest.raises(ValueError, match="aliases"):
        parse_prompt_set('{"prompt": "a", "answer": ["x", ""]}')
    out = tmp_path / "cli"
    assert run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet", "--no-plots", "--out_dir", str(out),
                     "--prompt", "one two three", "--answer", "four", "--alias", "five", "six"]) == 0
    gold = json.loads(next(out.glob("output-*.json")).read_text())["gold_answer"]
    assert [alias["string"] for alias in gold["aliases"]] == ["four", "five", "six"]
