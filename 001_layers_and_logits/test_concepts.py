"""Concepts: token sets (``token_set``) and their summed probability and best rank per layer,
checked against the Hugging Face model itself (its own residuals, final norm and head)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_reference import final_norm, hf_head, hf_residuals, load_hf

import layers_core as lc
from layers_core.model.tokens import token_set, token_text
from layers_core.pipeline.concepts import resolve_concepts
from layers_core.pipeline.sweep import SweepSettings
from layers_core.results.prompt_sets import check_concepts, parse_prompt_set

QUOTE_PROMPT = 'Français: "livre" - Deutsch: "'
TEMPLATE = 'Français: "{source}" - Deutsch: "{target}"'
SHOTS = [("fleuve", "Strom"), ("jardin", "Garten"), ("lait", "Milch"), ("oiseau", "Vogel"), ("vent", "Wind")]
CONCEPTS = {"de": ["Buch"], "en": "book", "fr": ["livre", "bouquin"]}


@pytest.fixture(scope="module")
def bundled(bundled_model_dir):
    return lc.load(bundled_model_dir, device="cpu", dtype="float32")


def _texts(tokenizer, ids):
    return [token_text(tokenizer, token_id) for token_id in ids]


def test_token_set_takes_every_whole_prefix_with_and_without_the_space(bundled):
    tokenizer = bundled.bridge.tokenizer
    texts = _texts(tokenizer, token_set(tokenizer, "Buch"))
    assert texts == ["B", "Bu", " Buch", " B", " Bu", " Buc"]  # SmolLM2 writes "Buch" as B·uch
    assert all("Buch".startswith(t) or " Buch".startswith(t) for t in texts)
    assert _texts(tokenizer, token_set(tokenizer, "Buch", prefixes=False)) == ["B", " Buch"]
    assert _texts(tokenizer, token_set(tokenizer, "Buch", spaces=False)) == ["B", "Bu"]
    both = token_set(tokenizer, ["Buch", "Buch", " Buch "])
    assert len(both) == len(set(both)) == 6  # duplicates removed, the words' own spaces ignored


def test_token_set_skips_byte_fragments_and_tokens_that_spell_something_else(bundled):
    tokenizer = bundled.bridge.tokenizer
    # " œ" is a byte piece of œ in SmolLM2's vocabulary: never a member; "œ" alone is a token
    assert _texts(tokenizer, token_set(tokenizer, "œ")) == ["œ"]
    # " Schlü": the tokenizer's first piece " Sch" is a prefix; "ü" bytes never are
    assert " Sch" in _texts(tokenizer, token_set(tokenizer, "Schlü"))
    with pytest.raises(ValueError, match="no whole-character token"):
        token_set(tokenizer, "東京")  # byte-level BPE splits 東 into bytes
    with pytest.raises(ValueError, match="not a word"):
        token_set(tokenizer, ["Buch", "  "])


def test_concept_names_and_words_are_checked():
    assert check_concepts({"de": "Buch"}) == {"de": ("Buch",)}
    for bad, message in (({}, "expected an object"), ({"de": []}, "needs a word"),
                         ({"p_answer": "x"}, "names a column"), ([["de", "Buch"]], "expected an object"),
                         ({"de": [3]}, "needs a word")):
        with pytest.raises(ValueError, match=message):
            check_concepts(bad)
    with pytest.raises(ValueError, match=r"<p>:1: 'concepts'"):
        parse_prompt_set(json.dumps({"prompt": "a", "answer": "b", "concepts": {"de": []}}), "<p>")


def _hf_concepts(hf, tokens, concepts):
    """Each concept's summed probability and best rank per layer, from the HF model alone:
    ``{name: ([p per layer], [rank per layer])}`` (float32 log-probs, as the lens computes)."""
    residuals, _ = hf_residuals(hf, tokens)
    head, norm = hf_head(hf), final_norm(hf)
    with torch.no_grad():
        log_probs = torch.stack([head(norm(h)) for h in residuals]).float()
    expected = {}
    for concept in concepts:
        ids = list(concept.token_ids)
        members = log_probs[:, ids]
        best = members.max(dim=-1).values
        expected[concept.name] = (members.exp().sum(-1).tolist(),
                                  [int((row > b).sum()) + 1 for row, b in zip(log_probs, best)])
    return expected


def _assert_matches(frame, expected, lens):
    for name, (probs, ranks) in expected.items():
        rows = frame[(frame.concept == name) & (frame.lens == lens)].sort_values("layer")
        assert rows.p.tolist() == pytest.approx(probs, abs=1e-5, rel=1e-4)
        assert rows.best_rank.tolist() == ranks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_concepts_equal_the_hf_models_own_numbers_on_tiny_models(tiny_dirs, family):
    lm = lc.load(tiny_dirs[family], device="cpu", dtype="float32")
    tokenizer = lm.bridge.tokenizer
    concepts = {"a": ["the", "and"], "b": "of"}
    s = lc.sweep(lm, "one two three four", None, settings=SweepSettings(concepts=concepts))
    expected = _hf_concepts(load_hf(tiny_dirs[family]), s.analysis.result.tokens,
                            resolve_concepts(tokenizer, concepts))
    _assert_matches(s.concepts, expected, "final")
    assert set(s.concepts.lens) == {"final", "arch"}
    assert len(s.concepts) == 2 * lm.n_layers * 2 + 2 * 2  # 2 lenses × (n+1) layers × 2 concepts


def test_concepts_on_gemma3_equal_the_hf_model_within_1e_5(gemma3_model_dir):
    lm = lc.load(gemma3_model_dir, device="cpu", dtype="float32")
    prompt = lc.few_shot(SHOTS, "livre", TEMPLATE)
    assert prompt.endswith('Wind"\nFrançais: "livre" - Deutsch: "')
    s = lc.sweep(lm, prompt, "Buch", settings=SweepSettings(concepts=CONCEPTS))
    expected = _hf_concepts(load_hf(gemma3_model_dir), s.analysis.result.tokens,
                            resolve_concepts(lm.bridge.tokenizer, CONCEPTS))
    _assert_matches(s.concepts, expected, "final")
    last = s.concepts[(s.concepts.lens == "final") & (s.concepts.layer == lm.n_layers)].set_index("concept")
    assert last.loc["de", "best_rank"] == 1 and last.loc["de", "p"] > last.loc["en", "p"] * 100  # Buch


def test_a_set_carries_concepts_and_meta_per_item_and_writes_them(bundled, tmp_path):
    items = [{"id": "book", "prompt": QUOTE_PROMPT, "answer": "Buch", "concepts": {"de": "Buch", "en": "book"},
              "meta": {"word": "book", "pair": ["fr", "de"]}},
             {"id": "cat", "prompt": 'Français: "chat" - Deutsch: "', "answer": "Katze",
              "concepts": {"de": "Katze", "en": "cat"}, "meta": {"word": "cat", "rare": True}}]
    ss = lc.sweep_set(bundled, items, settings=SweepSettings(batch_size=2))
    one = lc.sweep(bundled, items[1]["prompt"], "Katze",
                   settings=SweepSettings(concepts=items[1]["concepts"], records=False))
    cat = ss.concepts[ss.concepts.prompt_id == "cat"].drop(columns="prompt_id").reset_index(drop=True)
    assert cat[["lens", "layer", "concept", "best_rank"]].equals(one.concepts[["lens", "layer", "concept",
                                                                               "best_rank"]])
    assert cat.p.tolist() == pytest.approx(one.concepts.p.tolist(), rel=1e-4, abs=1e-7)
    assert ss.summary.word.tolist() == ["book", "cat"] and ss.summary.rare.isna().tolist() == [True, False]
    paths = ss.save(str(tmp_path), plots=False)
    written = lc.read_csv(paths["concepts"])
    assert written.columns.tolist() == ["prompt_id", "lens", "layer", "concept", "p", "best_rank"]
    assert written.drop(columns="p").equals(ss.concepts.drop(columns="p"))
    entries = [json.loads(line) for line in open(tmp_path / f"output-{paths['name']}-prompts.jsonl")]
    assert entries[0]["meta"] == {"word": "book", "pair": ["fr", "de"]}
    assert entries[0]["concepts"]["de"]["tokens"][:2] == ["B", "Bu"]
    summary = lc.read_csv(paths["summary"])
    assert json.loads(summary.meta[1]) == {"word": "cat", "rare": True}


def test_few_shot_writes_the_examples_then_the_query_up_to_its_target():
    assert lc.few_shot([("a", "b"), ("c", "d")], "e", "{source} = {target}.", " | ") == "a = b. | c = d. | e = "
    assert lc.few_shot([], "e") == "e: "
    with pytest.raises(ValueError, match="once each"):
        lc.few_shot([("a", "b")], "c", "{source} only")


def test_the_command_line_writes_concepts_and_refuses_bad_ones_in_one_line(tiny_dirs, tmp_path, capsys):
    import run

    from conftest import assert_clean_failure

    out = tmp_path / "out"
    argv = ["--device", "cpu", tiny_dirs["llama"], "--quiet", "--no-plots", "--out_dir", str(out),
            "--prompt", "one two three", "--concepts", '{"a": ["the", "and"], "b": "of"}']
    assert run.main(argv) == 0
    concepts = lc.read_csv(str(next(out.glob("output-*-concepts.csv"))))
    assert set(concepts.concept) == {"a", "b"} and set(concepts.lens) == {"final", "arch"}
    document = json.loads(next(out.glob("output-*.json")).read_text())
    assert document["concepts"]["b"]["words"] == ["of"]
    capsys.readouterr()
    for bad in ('{"a": ', '{"a": []}', '["the"]'):
        with pytest.raises(SystemExit) as exit_info:
            run.main([*argv[:-1], bad])
        assert_clean_failure(capsys.readouterr(), exit_info.value.code, 2)


def test_track_refuses_a_string_that_is_not_one_token(bundled, tiny_dirs, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"'New York' is 2 tokens \(New·ĠYork\).*--concepts"):
        lc.sweep(bundled, "I live in", "Paris", settings=SweepSettings(track=("New York",)))
    s = lc.sweep(bundled, "I live in", "Paris", settings=SweepSettings(track=(" Paris",)))
    assert set(s.tracked.token) == {" Paris"}
    import run

    code = run.main(["--device", "cpu", tiny_dirs["llama"], "--quiet", "--no-plots", "--out_dir", str(tmp_path),
                     "--prompt", "one two", "--track", " New York"])
    captured = capsys.readouterr()
    assert code != 0 and "tokens" in captured.err and "--concepts" in captured.err
    assert "Traceback" not in captured.err and not list(tmp_path.glob("output-*-tracked.csv"))
