"""Collapse rules (copy, entropy, semantic), gold-answer resolution and summary layer indices."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:  # torch is imported where it is used, so the constants load without it
    from torch import Tensor

COPY_THRESHOLD = 0.90  # minimum P(top-1) for copy collapse
COPY_MARGIN = 0.05  # P(top-1) − P(top-2) must exceed this
ENTROPY_COLLAPSE_BITS = 1.0  # entropy collapse at ≤ this; copy fallback at < this
MILESTONE_RANKS = (1, 5, 10)
MILESTONE_KL_BITS = (0.5, 1.0)
SEMANTIC_MARGIN = 0.1  # L_semantic_margin: p_answer − p(runner-up) must reach this

VARIANT_WITH_SPACE = "with_space"
VARIANT_NO_SPACE = "no_space"
VARIANT_UNKNOWN = "unknown"


@dataclass(frozen=True)
class CopyRule:
    """The copy rule's thresholds: p1 > ``threshold`` and p1 − p2 > ``margin``; with
    ``entropy_fallback``, entropy < ``fallback_bits`` also counts (the seed's rule)."""

    threshold: float = COPY_THRESHOLD
    margin: float = COPY_MARGIN
    entropy_fallback: bool = True
    fallback_bits: float = ENTROPY_COLLAPSE_BITS


def copy_collapse_flags(
    top1_ids: Tensor,
    p_top1: Tensor,
    p_top2: Tensor,
    entropy_bits: Tensor,
    prompt_ids: Iterable[int],
    rule: CopyRule = CopyRule(),
    echo_id: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorised copy rule over rows ``[R]``; returns (copy_collapse, strict, copy_collapse_prompt)
    bool tensors.

    strict = top-1 ∈ prompt ids ∧ p1 > threshold ∧ p1 − p2 > margin;
    copy_collapse = strict ∨ (fallback ∧ entropy < fallback threshold) (the seed's rule: the
    fallback fires whatever the top-1 is); copy_collapse_prompt = copy_collapse ∧ top-1 ∈ prompt ids.
    ``echo_id`` (tied embeddings: the current token): a row whose top-1 is it is never a copy, by
    any branch: with W_U = W_Eᵀ a residual still close to that token's embedding decodes to it.
    """
    import torch

    ids = torch.tensor(sorted(set(int(i) for i in prompt_ids) - {echo_id}), dtype=top1_ids.dtype,
                       device=top1_ids.device)
    in_prompt = torch.isin(top1_ids, ids)
    strict = in_prompt & (p_top1 > rule.threshold) & ((p_top1 - p_top2) > rule.margin)
    if not rule.entropy_fallback:
        return strict, strict, strict
    copy = strict | ((entropy_bits < rule.fallback_bits) & (top1_ids != (-1 if echo_id is None else echo_id)))
    return copy, strict, copy & in_prompt


def is_headline_copy(top1_id: int, top1_text: str, p_top1: float, p_top2: float, prompt_ids: Iterable[int],
                     answer_first_id: int | None, rule: CopyRule = CopyRule()) -> bool:
    """The headline copy rule (``L_copy`` from round 3, except under ``--norm arch``): the top-1 is
    a token of the prompt with a letter or digit in it (no punctuation or whitespace), it is not
    the answer's first piece, and p1 > threshold and p1 − p2 > margin; no entropy fallback."""
    return (top1_id in set(prompt_ids) and any(char.isalnum() for char in top1_text)
            and top1_id != answer_first_id and p_top1 > rule.threshold and p_top1 - p_top2 > rule.margin)


def detect_copy_collapse(
    logits: Tensor,
    prompt_ids: Iterable[int],
    copy_threshold: float = COPY_THRESHOLD,
    copy_margin: float = COPY_MARGIN,
    entropy_bits: float | None = None,
    entropy_fallback_threshold: float = ENTROPY_COLLAPSE_BITS,
    use_entropy_fallback: bool = True,
) -> bool:
    """Copy collapse for one row of logits ``[V]``.

    The entropy fallback needs ``entropy_bits``: without it (the legacy contract) only the strict
    rule applies.
    """
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, k=2)
    use_fallback = use_entropy_fallback and entropy_bits is not None
    entropy = torch.tensor([entropy_bits if use_fallback else float("inf")])
    flag, _, _ = copy_collapse_flags(
        top.indices[:1], top.values[:1], top.values[1:2], entropy, prompt_ids,
        CopyRule(copy_threshold, copy_margin, use_fallback, entropy_fallback_threshold),
    )
    return bool(flag[0])


def is_entropy_collapse(entropy_bits: float, threshold: float = ENTROPY_COLLAPSE_BITS) -> bool:
    """Entropy collapse: ``entropy_bits <= threshold``."""
    return entropy_bits <= threshold


def is_semantic_top1(top1_text: str, ground_truth: str | None) -> bool:
    """String fallback for ``is_answer`` (used only when the gold ids are unresolved; no answer:
    False)."""
    return ground_truth is not None and top1_text.strip() == ground_truth.strip()


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


PROMPT_ENDS_IN_SPACE = ("the prompt ends in whitespace: the answer is scored as its continuation "
                        "(no second space); drop the trailing space to score the answer with its own")

ANSWER_JOINS = ("auto", "space", "none")  # how an answer follows its prompt (``answer_join``)
_OPENERS = set("\"'“‘«‹([{「『【〈《〔｛（［`")
_OPENS_A_QUOTE = set(":=([{") # a straight quote after these (or whitespace, or nothing) opens
# scripts written without spaces between words: Thai, Lao, Tibetan, Myanmar, Khmer, CJK
# punctuation, Hiragana/Katakana, Han (and extensions), fullwidth forms
_UNSPACED = ((0x0E00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x3000, 0x30FF), (0x3400, 0x4DBF),
             (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF), (0x20000, 0x2FA1F))


def _unspaced_script(char: str) -> bool:
    return any(low <= ord(char) <= high for low, high in _UNSPACED)


def answer_join(prompt: str, join: str = "auto") -> str:
    """How the answer follows ``prompt``: ``"space"`` or ``"none"``. ``join="auto"`` reads the
    prompt's last character: none after whitespace (a newline, a chat template's turn), after an
    opening quote or bracket (``Deutsch: "`` → ``Buch``), and after a script written without
    spaces (``日本の首都は`` → ``東京``); a space after anything else (a word, a digit, punctuation
    that ends a clause, a closing quote). A straight quote opens when whitespace, ``:``, ``=`` or a
    bracket (or nothing) comes before it."""
    if join not in ANSWER_JOINS:
        raise ValueError(f"answer_join must be one of {', '.join(ANSWER_JOINS)}, got {join!r}")
    if join != "auto":
        return join
    if not prompt or prompt[-1].isspace() or _unspaced_script(prompt[-1]):
        return "none"
    last, before = prompt[-1], prompt[-2:-1]
    if last in "\"'" and before and not (before.isspace() or before in _OPENS_A_QUOTE):
        return "space"  # a closing quote
    return "none" if last in _OPENERS else "space"


class GoldAnswer(TypedDict):
    """The answer resolved to token ids (``resolve_gold_answer``); the JSON's ``gold_alignment``."""

    string: str | None  # the answer as typed, stripped (None: no answer)
    pieces: list[str]  # every token of the answer, as the tokenizer spells it
    first_id: int | None  # the first piece's id: what the rank and the milestones follow
    answer_ids: list[int]  # every piece's id (teacher-forced p_sequence)
    variant: str  # with_space | no_space | unknown
    ok: bool  # resolved as a continuation of the prompt
    status: str  # ok | unresolved | no_answer
    warnings: list[str]
    first_ids: list[int]  # every resolved alias's first id, once each (one answer: [first_id])
    aliases: list[dict]  # an answer given as a list: each alias's string, pieces, ids, variant, ok


def resolve_gold_answer(tokenizer: Any, prompt: str, answer: str | Sequence[str] | None, *,
                        join: str = "auto") -> GoldAnswer:
    """Resolves the answer to token ids as the continuation of ``prompt``.

    The answer's leading and trailing whitespace never becomes a token: ``" Buenos Aires"`` is
    ``"Buenos Aires"``. ``join`` (``answer_join``: ``auto`` by the prompt's last character,
    ``space`` or ``none``) picks ``prompt + " " + answer`` (``with_space``) or ``prompt + answer``
    (``no_space``); a variant counts only if its ids start with the prompt's ids, and under
    ``auto`` the other variant is the fallback. A prompt that ends in whitespace already holds the
    space: the answer is its continuation (the answer's own ids where the tokenizer would merge
    the space), and a trailing space or tab the user typed is warned about. Returns ``{string,
    pieces, first_id, answer_ids, variant, ok, status, warnings}``; unresolved → ``first_id``
    None, ``ok`` False; no answer (None) → status ``no_answer``.

    ``answer`` may be a list of aliases (``["New York", "NYC"]``): each is resolved; the first
    that resolves gives ``string``, ``pieces``, ``first_id`` and ``answer_ids``, ``first_ids``
    holds every resolved alias's first id (the rank is the best of them, the probability their
    sum) and ``aliases`` each alias's own resolution.
    """
    if answer is not None and not isinstance(answer, str):
        return _resolve_aliases(tokenizer, prompt, list(answer), join)
    if answer is None or not answer.strip():
        return _unresolved(None, "no_answer", [])
    answer = answer.strip()
    prompt_ids = _encode(tokenizer, prompt)
    chosen = answer_join(prompt, join)
    ends_in_space = prompt[-1:].isspace()
    warnings = [PROMPT_ENDS_IN_SPACE] if prompt[-1:] in (" ", "\t") else []
    variants = {"space": (VARIANT_WITH_SPACE, f"{prompt} {answer}"), "none": (VARIANT_NO_SPACE, prompt + answer)}
    order = [variants[chosen]] + ([variants["space" if chosen == "none" else "none"]]
                                  if join == "auto" and not ends_in_space else [])
    for variant, text in order:
        ids = _encode(tokenizer, text)
        if ids[: len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids):
            return _resolved(tokenizer, answer, ids[len(prompt_ids):], variant, warnings)
    if ends_in_space and chosen == "none":  # "is " + "Berlin" merges the space into "ĠBerlin"
        return _resolved(tokenizer, answer, _encode(tokenizer, answer), VARIANT_NO_SPACE, warnings)
    return _unresolved(answer, "unresolved", warnings)


def _resolved(tokenizer: Any, answer: str, answer_ids: list[int], variant: str,
              warnings: list[str]) -> GoldAnswer:
    return {"string": answer, "pieces": list(tokenizer.convert_ids_to_tokens(answer_ids)),
            "first_id": answer_ids[0], "answer_ids": answer_ids, "variant": variant, "ok": True,
            "status": "ok", "warnings": warnings, "first_ids": [answer_ids[0]], "aliases": []}


def _unresolved(answer: str | None, status: str, warnings: list[str]) -> GoldAnswer:
    return {"string": answer, "pieces": [], "first_id": None, "answer_ids": [], "variant": VARIANT_UNKNOWN,
            "ok": False, "status": status, "warnings": warnings, "first_ids": [], "aliases": []}


ALIAS_KEYS = ("string", "pieces", "first_id", "answer_ids", "variant", "ok")


def _resolve_aliases(tokenizer: Any, prompt: str, aliases: list[str], join: str) -> GoldAnswer:
    if not aliases or not all(isinstance(alias, str) and alias.strip() for alias in aliases):
        raise ValueError(f"an answer's aliases must be non-empty strings, got {aliases!r}")
    golds = [resolve_gold_answer(tokenizer, prompt, alias, join=join) for alias in aliases]
    warnings = list(dict.fromkeys(w for gold in golds for w in gold["warnings"]))
    resolved = [gold for gold in golds if gold["ok"]]
    own = [{key: gold[key] for key in ALIAS_KEYS} for gold in golds]
    if not resolved:
        return {**_unresolved(golds[0]["string"], "unresolved", warnings), "aliases": own}
    first_ids = list(dict.fromkeys(gold["first_id"] for gold in resolved))
    return {**resolved[0], "warnings": warnings, "first_ids": first_ids, "aliases": own}


def answer_token_ids(gold: Mapping[str, Any]) -> int | list[int] | None:
    """What the answer columns follow: None (no resolved answer), the first token's id, or with
    aliases of different first tokens their ids (probability summed, rank the best)."""
    ids = gold.get("first_ids") or ([] if gold.get("first_id") is None else [gold["first_id"]])
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def _first_layer(rows: Sequence[Mapping[str, Any]], predicate) -> int | None:
    for row in rows:
        if predicate(row):
            return int(row["layer"])
    return None


def _le(value: Any, bound: float) -> bool:
    return value is not None and value <= bound


def summarize_collapse(pure_rows: Sequence[Mapping[str, Any]], skip_layer0_copy: bool = False,
                       headline: bool = False) -> dict:
    """First layers of each collapse over pure rows ordered by layer.

    Rows carry ``layer``, ``copy_collapse``, ``copy_strict``, ``copy_collapse_prompt``,
    ``entropy_collapse``, ``is_answer`` (and ``copy_headline``). Returns ``L_copy``,
    ``L_copy_strict``, ``L_copy_H``, ``L_semantic``, ``delta_layers`` and ``L_copy_prompt``.
    ``L_copy`` (and ``delta_layers``) follow the seed's ``copy_collapse``, or with ``headline`` the
    headline rule (``is_headline_copy``). With ``skip_layer0_copy`` (tied embeddings: layer 0
    decodes to the input token itself) the copy indices start at layer 1.
    """
    copy_rows = [r for r in pure_rows if not (skip_layer0_copy and int(r["layer"]) == 0)]
    l_copy = _first_layer(copy_rows, lambda r: bool(r["copy_headline" if headline else "copy_collapse"]))
    l_semantic = _first_layer(pure_rows, lambda r: bool(r["is_answer"]))
    return {
        "L_copy": l_copy,
        "L_copy_strict": _first_layer(copy_rows, lambda r: bool(r.get("copy_strict"))),
        "L_copy_H": _first_layer(pure_rows, lambda r: bool(r["entropy_collapse"])),
        "L_semantic": l_semantic,
        "delta_layers": None if l_copy is None or l_semantic is None else l_semantic - l_copy,
        "L_copy_prompt": _first_layer(copy_rows, lambda r: bool(r.get("copy_collapse_prompt"))),
    }


def semantic_milestones(pure_rows: Sequence[Mapping[str, Any]], margin: float = SEMANTIC_MARGIN) -> dict:
    """Milestones that hold, over pure rows ordered by layer (``answer_rank``, ``p_answer``, ``prob2``).

    ``L_semantic_stable``: the first layer from which the answer stays rank 1 through the last
    layer (None unless it is rank 1 at the last layer). ``L_semantic_margin``: the first layer
    where the answer is rank 1 and ``p_answer − prob2 ≥ margin`` (the runner-up's probability).
    """
    stable = None
    for row in reversed(pure_rows):
        if row.get("answer_rank") != 1:
            break
        stable = int(row["layer"])
    leads = _first_layer(pure_rows, lambda r: r.get("answer_rank") == 1 and r.get("p_answer") is not None
                         and r["p_answer"] - r["prob2"] >= margin)
    return {"L_semantic_stable": stable, "L_semantic_margin": leads}


def compute_milestones(pure_rows: Sequence[Mapping[str, Any]]) -> dict:
    """First layers with answer_rank ≤ 1/5/10 and kl_to_final_bits ≤ 0.5/1.0 (None if never)."""
    milestones: dict[str, int | None] = {}
    for rank in MILESTONE_RANKS:
        milestones[f"first_rank_le_{rank}"] = _first_layer(
            pure_rows, lambda r, b=rank: _le(r.get("answer_rank"), b))
    for bound in MILESTONE_KL_BITS:
        milestones[f"first_kl_below_{bound}"] = _first_layer(
            pure_rows, lambda r, b=bound: _le(r.get("kl_to_final_bits"), b))
    return milestones


def ambiguous_first_pieces(golds: Sequence[Mapping[str, Any]]) -> list[bool]:
    """For each gold answer of a set: it has several tokens and another answer starts with the
    same first token id, so a first-piece rank of 1 cannot tell the two apart."""
    counts: dict[int, int] = {}
    for gold in golds:
        if gold.get("first_id") is not None:
            counts[gold["first_id"]] = counts.get(gold["first_id"], 0) + 1
    return [len(gold.get("answer_ids") or ()) > 1 and counts.get(gold.get("first_id"), 0) > 1 for gold in golds]
