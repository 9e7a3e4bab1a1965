"""What the explorer computes: a checked request in, the report's data (or ``run``'s files as a
zip) out. Every field of a request is checked here, in one place, with a one-line reason; a
request names lenses only by the names the server offers (``ExplorerLenses``), never a path."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from layers_core.model.lens_model import LensModel

LOGIT_LENSES = ("final", "arch", "none")  # the logit lens under each norm strategy: always offered
MAX_PROMPT_CHARS = 20_000  # refused before tokenising
MAX_ANSWER_CHARS = 200
MAX_GENERATE = 64
FIELDS = {"prompt", "answer", "lens", "generate", "client"}


class BadRequest(ValueError):
    """A request the explorer refuses; ``status`` is the HTTP status, the message one line."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LensRequest:
    """One prompt to read: the ``answer`` to follow (None: none), the ``lens`` by name, and
    ``generate`` tokens of continuation (0: none)."""

    prompt: str
    answer: str | None = None
    lens: str = "final"
    generate: int = 0


@dataclass
class ExplorerLenses:
    """The lenses a server offers, by name: the logit lens under each norm strategy, and the
    fitted lenses its flags (or the model's lens cache) provide, loaded once at start."""

    fitted: Mapping[str, Any]

    @property
    def names(self) -> list[str]:
        return [*LOGIT_LENSES, *self.fitted]

    def settings_for(self, name: str, base: Any) -> tuple[Any, Any]:
        """(the ``lens`` argument of ``sweep``, its settings) for the lens called ``name``."""
        if name in LOGIT_LENSES:
            return "logit", replace(base, norm_strategy=name)
        return self.fitted[name], base


def _text(body: Mapping[str, Any], key: str, limit: int, required: bool) -> str | None:
    value = body.get(key)
    if value is None or (value == "" and not required):
        if required:
            raise BadRequest(f"'{key}' is required")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    if len(value) > limit:
        raise BadRequest(f"'{key}' has {len(value):,} characters; the explorer takes at most {limit:,}", 413)
    if "\x00" in value:
        raise BadRequest(f"'{key}' holds a NUL character")
    return value


def parse_request(body: Any, lenses: ExplorerLenses) -> LensRequest:
    """A ``LensRequest`` from a decoded JSON body; ``BadRequest`` naming the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", 400)
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}' (the fields are {', '.join(sorted(FIELDS))})", 400)
    prompt = _text(body, "prompt", MAX_PROMPT_CHARS, required=True)
    if not prompt.strip():
        raise BadRequest("'prompt' is empty")
    answer = _text(body, "answer", MAX_ANSWER_CHARS, required=False)
    lens = body.get("lens", "final")
    if lens not in lenses.names:
        raise BadRequest(f"no lens {str(lens)[:40]!r} here (this server has {', '.join(lenses.names)})")
    generate = body.get("generate", 0)
    if isinstance(generate, bool) or not isinstance(generate, int) or not 0 <= generate <= MAX_GENERATE:
        raise BadRequest(f"'generate' must be a whole number from 0 to {MAX_GENERATE}")
    return LensRequest(prompt, answer.strip() if answer and answer.strip() else None, lens, generate)


def check_length(lm: LensModel, request: LensRequest, max_tokens: int) -> int:
    """The prompt's token count; ``BadRequest`` (413) above ``max_tokens`` or the context."""
    count = len(lm.bridge.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
    limit = min(max_tokens, int(lm.bridge.cfg.n_ctx))
    if count + request.generate > limit:
        raise BadRequest(f"the prompt is {count:,} tokens (+{request.generate} generated); this server reads at "
                         f"most {limit:,} (--max-tokens, the model's context {int(lm.bridge.cfg.n_ctx):,})", 413)
    return count


def _sweep(lm: LensModel, lenses: ExplorerLenses, request: LensRequest, base: Any) -> Any:
    from layers_core.api.prompt import sweep

    lens, settings = lenses.settings_for(request.lens, base)
    settings = replace(settings, attribution=request.answer is not None, generate=request.generate or None)
    return sweep(lm, request.prompt, request.answer, lens=lens, control=False, settings=settings)


def report_data(lm: LensModel, lenses: ExplorerLenses, request: LensRequest, base: Any) -> dict:
    """The HTML report's data for ``request`` (what the page draws)."""
    result = _sweep(lm, lenses, request, base)
    data = result.report_data()
    data["request"] = {"prompt": request.prompt, "answer": request.answer, "lens": request.lens,
                       "generate": request.generate}
    return data


def result_zip(lm: LensModel, lenses: ExplorerLenses, request: LensRequest, base: Any) -> bytes:
    """``run``'s files for ``request`` (CSVs, JSON, HTML and PNGs) as one zip, in memory."""
    result = _sweep(lm, lenses, request, base)
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="layers-serve-") as directory:
        result.save(directory)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(os.listdir(directory)):
                archive.write(os.path.join(directory, name), name)
    return buffer.getvalue()
