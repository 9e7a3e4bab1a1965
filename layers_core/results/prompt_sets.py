"""Prompt sets (``--prompts FILE.jsonl``): parsing, the per-prompt summary rows and the aggregate.

Torch-free, so a malformed file is rejected before any model work starts.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layers_core.collapse_rules import ANSWER_JOINS

SUMMARY_COLUMNS = [
    "prompt_id", "prompt", "answer", "prompt_tokens", "answer_tokens", "L_copy", "L_copy_strict", "L_semantic",
    "L_semantic_stable", "L_semantic_margin",
    "first_rank_le_1", "first_rank_le_5", "first_rank_le_10", "first_kl_below_0.5",
    "first_kl_below_1.0", "final_top1", "final_p_answer", "p_sequence", "gold_status", "meta",
]
LAYER_INDEX_COLUMNS = SUMMARY_COLUMNS[5:15]
TOKEN_COUNT_COLUMNS = ("prompt_tokens", "answer_tokens")
_DIAGNOSTICS_INDICES = LAYER_INDEX_COLUMNS[:5]  # top-level diagnostics keys; the rest are milestones
PROMPT_ID_COLUMN = "prompt_id"
# a concept's name is a column of the layer curves: it must not hide one of these
RESERVED_CONCEPT_NAMES = ("entropy", "p_top1", "p_top5", "p_answer", "answer_rank", "kl_to_final_bits", "layer",
                          "lens", "prompt_id", "concept", "p", "best_rank")


@dataclass(frozen=True)
class PromptItem:
    """One fact to sweep; ``control_*`` optionally pairs it with a control prompt."""

    prompt_id: str
    prompt: str
    answer: str | tuple[str, ...]  # a tuple: aliases (rank = the best alias's, probability = their sum)
    control_prompt: str | None = None
    control_answer: str | None = None
    answer_join: str | None = None  # auto | space | none: this item's joining (None: the set's)
    concepts: Mapping[str, tuple[str, ...]] | None = None  # {name: words} (None: the set's, if any)
    meta: Mapping[str, Any] | None = None  # any JSON values: passed through to the summary and the JSON


def check_concepts(concepts: Any, where: str = "concepts") -> dict[str, tuple[str, ...]]:
    """``{name: words}`` from a mapping of names to a word or a list of words; ``ValueError``
    (naming ``where``) for anything else, an empty name or word list, or a reserved name."""
    if not isinstance(concepts, Mapping) or not concepts:
        raise ValueError(f"{where}: expected an object of names to words, e.g. {{\"de\": [\"Buch\"]}}")
    checked = {}
    for name, words in concepts.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: a concept's name must be a non-empty string, got {name!r}")
        if name in RESERVED_CONCEPT_NAMES:
            raise ValueError(f"{where}: {name!r} names a column of the tables; choose another concept name")
        words = [words] if isinstance(words, str) else words
        if (not isinstance(words, Sequence) or not words
                or not all(isinstance(word, str) and word.strip() for word in words)):
            raise ValueError(f"{where}: concept {name!r} needs a word or a list of non-empty words")
        checked[name] = tuple(words)
    return checked


def _answer_field(record: Mapping[str, Any], where: str) -> str | tuple[str, ...]:
    """``answer``: a non-empty string, or a non-empty list of them (aliases)."""
    value = record.get("answer")
    if isinstance(value, list):
        if not value or not all(isinstance(alias, str) and alias.strip() for alias in value):
            raise ValueError(f"{where}: 'answer' as a list must hold non-empty strings (its aliases)")
        return tuple(value)
    return _text_field(record, "answer", where, True)


def answer_text(answer: str | Sequence[str] | None) -> str | None:
    """An answer as one cell: aliases joined by `` | ``."""
    return answer if answer is None or isinstance(answer, str) else " | ".join(answer)


def _text_field(record: Mapping[str, Any], key: str, where: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string")
    return value


PROMPT_KEYS = ("id", "prompt", "answer", "control_prompt", "control_answer", "answer_join", "concepts", "meta")


def item_from_record(record: Any, where: str, default_id: int) -> PromptItem:
    """One prompt-set entry from a JSON object; ``ValueError`` naming ``where`` if malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'answer'")
    unknown = sorted(set(record) - set(PROMPT_KEYS))
    if unknown:
        close = {key: difflib.get_close_matches(key, PROMPT_KEYS, n=1) for key in unknown}
        hints = [f"{key!r}" + (f" (did you mean {close[key][0]!r}?)" if close[key] else "")
                 for key in unknown]
        raise ValueError(f"{where}: unknown key {', '.join(hints)}; expected {', '.join(PROMPT_KEYS)}")
    control_prompt = _text_field(record, "control_prompt", where, required=False)
    control_answer = _text_field(record, "control_answer", where, required=False)
    if (control_prompt is None) != (control_answer is None):
        raise ValueError(f"{where}: 'control_prompt' and 'control_answer' go together")
    join = record.get("answer_join")
    if join is not None and join not in ANSWER_JOINS:
        raise ValueError(f"{where}: 'answer_join' must be one of {', '.join(ANSWER_JOINS)}, got {join!r}")
    concepts = record.get("concepts")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{where}: 'meta' must be a JSON object (of any values), got {type(meta).__name__}")
    hidden = sorted(set(meta or ()) & set(SUMMARY_COLUMNS))
    if hidden:
        raise ValueError(f"{where}: meta key {hidden[0]!r} names a summary column; choose another key")
    return PromptItem(str(record.get("id", default_id)), _text_field(record, "prompt", where, True),
                      _answer_field(record, where), control_prompt, control_answer, join,
                      None if concepts is None else check_concepts(concepts, f"{where}: 'concepts'"), meta)


def check_unique_ids(items: Sequence[PromptItem]) -> None:
    """``ValueError`` naming the first id that appears twice."""
    seen: set[str] = set()
    for item in items:
        if item.prompt_id in seen:
            raise ValueError(f"duplicate id {item.prompt_id!r}")
        seen.add(item.prompt_id)


def parse_prompt_set(text: str, source: str = "<prompts>") -> list[PromptItem]:
    """Parses JSONL: one object per line with ``prompt``, ``answer`` and optional ``id``,
    ``control_prompt``, ``control_answer``. Blank lines and a leading byte-order mark are
    skipped; ``id`` defaults to the line number. Raises ``ValueError`` naming the file and line
    of the first problem."""
    items: list[PromptItem] = []
    seen: set[str] = set()
    # lines end at \n only: U+2028, U+0085 and the like are valid inside a JSON string
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        except RecursionError:
            raise ValueError(f"{where}: not a prompt (JSON nested too deeply)") from None
        item = item_from_record(record, where, number)
        if item.prompt_id in seen:
            raise ValueError(f"{where}: duplicate id {item.prompt_id!r}")
        seen.add(item.prompt_id)
        items.append(item)
    if not items:
        raise ValueError(f"{source}: no prompts")
    return items


def load_prompt_set(path: str) -> list[PromptItem]:
    """Reads and parses a JSONL prompt set (see ``parse_prompt_set``)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read prompt set {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column "
                         f"{column}); save the file as UTF-8") from None
    return parse_prompt_set(text, path)


def summary_row(item: PromptItem, prompt_tokens: int, diagnostics: Mapping[str, Any],
                pure_rows: Sequence[Mapping[str, Any]], p_sequence: float | None = None) -> dict:
    """One ``output-<name>-summary.csv`` row from a prompt's diagnostics and pure rows;
    ``p_sequence``: the whole answer's teacher-forced probability (every piece, every alias)."""
    milestones = diagnostics["milestones"]
    last = pure_rows[-1]
    return {
        "prompt_id": item.prompt_id, "prompt": item.prompt, "answer": answer_text(item.answer),
        "prompt_tokens": prompt_tokens, "answer_tokens": len(diagnostics["gold_alignment"]["answer_ids"]),
        **{key: diagnostics[key] for key in _DIAGNOSTICS_INDICES},
        **{key: milestones[key] for key in LAYER_INDEX_COLUMNS[len(_DIAGNOSTICS_INDICES):]},
        "final_top1": last["top1"], "final_p_answer": last["p_answer"],
        "p_sequence": p_sequence,
        "gold_status": diagnostics["gold_alignment"]["status"],
        "meta": json.dumps(item.meta, ensure_ascii=False, separators=(",", ":")) if item.meta else "",
    }


def quartiles(values: list[int]) -> dict:
    """n, median, quartiles (inclusive method) and IQR of ``values``; None where there are none."""
    if not values:
        return {"n": 0, "median": None, "q1": None, "q3": None, "iqr": None}
    if len(values) == 1:
        q1 = q3 = float(values[0])
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"n": len(values), "median": float(statistics.median(values)), "q1": q1, "q3": q3,
            "iqr": q3 - q1}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict:
    """Count, fraction with a resolved gold answer, and median / quartiles / IQR of each layer
    index over the prompts where it is not null."""
    return {
        "count": len(rows),
        "fraction_resolved": sum(r["gold_status"] == "ok" for r in rows) / max(1, len(rows)),
        "layer_indices": {key: quartiles([int(r[key]) for r in rows if r[key] is not None])
                          for key in LAYER_INDEX_COLUMNS},
    }


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with 0 ≤ K < N; ``ValueError`` otherwise."""
    k, slash, n = text.partition("/")
    if not slash or not k.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(k) < int(n):
        raise ValueError(f"--shard {text}: expected K/N with 0 <= K < N, e.g. 0/3")
    return int(k), int(n)


AUTO_SHARD = "auto"
SHARD_DIR = "shard-{k}-of-{n}"  # where a --shard auto shard writes, inside --out_dir
_SHARD_DIR_PATTERN = r"shard-(\d+)-of-(\d+)$"


@dataclass(frozen=True)
class ShardSpec:
    """This process's share of a set: shard ``k`` of ``n``, and which launcher said so."""

    k: int
    n: int
    launcher: str  # "torchrun", "slurm-array", "slurm-tasks" or "explicit"
    local_rank: int | None = None  # torchrun: the GPU of this process on its node

    @property
    def text(self) -> str:
        return f"{self.k}/{self.n}"


def _env_pair(env: Mapping[str, str], index: str, count: str) -> tuple[int, int] | None:
    if index in env and count in env:
        return int(env[index]), int(env[count])
    return None


def resolve_shard(text: str, env: Mapping[str, str]) -> ShardSpec:
    """``K/N``, or ``auto`` read from the launcher's environment: torchrun (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``), a Slurm array (``SLURM_ARRAY_TASK_ID``,
    ``SLURM_ARRAY_TASK_COUNT``), else Slurm tasks (``SLURM_PROCID``, ``SLURM_NTASKS``).
    ``ValueError`` (one line) when ``auto`` finds none of them."""
    if text != AUTO_SHARD:
        k, n = parse_shard(text)
        return ShardSpec(k, n, "explicit")
    for launcher, (index, count) in (("torchrun", ("RANK", "WORLD_SIZE")),
                                      ("slurm-array", ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")),
                                      ("slurm-tasks", ("SLURM_PROCID", "SLURM_NTASKS"))):
        try:
            pair = _env_pair(env, index, count)
        except ValueError:
            raise ValueError(f"--shard auto: {index}/{count} are not integers") from None
        if pair is not None:
            k, n = pair
            if not 0 <= k < n:
                raise ValueError(f"--shard auto: {index}={k} is not in 0..{count}-1={n - 1}")
            local = int(env["LOCAL_RANK"]) if launcher == "torchrun" and "LOCAL_RANK" in env else None
            return ShardSpec(k, n, launcher, local)
    raise ValueError("--shard auto needs a launcher's environment: torchrun (RANK, WORLD_SIZE) or "
                     "Slurm (SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or SLURM_PROCID/SLURM_NTASKS)")


def shard_dirs(directory: str) -> list[str]:
    """The ``shard-K-of-N`` folders a ``--shard auto`` run left in ``directory``, in K order."""
    found = [(int(m.group(1)), name) for name in os.listdir(directory)
             if (m := re.match(_SHARD_DIR_PATTERN, name)) and os.path.isdir(os.path.join(directory, name))]
    return [os.path.join(directory, name) for _, name in sorted(found)]


def shard_of(items: Sequence[PromptItem], shard: tuple[int, int] | None) -> tuple[list[int], list[PromptItem]]:
    """The 0-based file positions and items of shard K of N: the items whose position ≡ K mod N."""
    k, n = shard or (0, 1)
    chosen = [(index, item) for index, item in enumerate(items) if index % n == k]
    return [index for index, _ in chosen], [item for _, item in chosen]
