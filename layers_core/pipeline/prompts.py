"""The legacy prompts, verbatim, and the chat wrapping of a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
DEFAULT_ANSWER = "Berlin"
TARGET_PREDICTION = "first unseen token (likely '{answer}')"

TEST_PROMPTS = (
    "Berlin is the capital of",
    "Germany's capital city is called simply",
    "The capital city of Germany is named simply",
    "Germany has its capital at the city called simply",
    "In Germany the capital city is simply",
    "Germany's capital city is called",
    "The capital city of Germany is named",
    "Germany has its capital at",
    "In Germany the capital city is known as",
    "Give the country name only, plain text. Berlin is the capital of",
    "Give the city name only, plain text. Germany's capital city is called",
    "Give the city name only, plain text. The capital city of Germany is named simply",
    "Give the city name only, plain text. Germany has its capital at",
    "Give the city name only, plain text. In Germany, the capital city is known as",
)
TEMPERATURES = (0.1, 2.0)
TEST_PROMPT_TOP_K = 10
TEMPERATURE_TOP_K = 15
FINAL_PREDICTION_TOP_K = 20

# The control pass (same template, another country): a lens that "finds" Berlin here is suspect.
DEFAULT_CONTROL_PROMPT = "Give the city name only, plain text. The capital of France is called simply"
DEFAULT_CONTROL_ANSWER = "Paris"
Control = tuple[str, str] | bool | None  # a (prompt, answer) pair; None: the default; False: none


def default_control(prompt: str, control: Control) -> tuple[str, str] | None:
    """None → France → Paris for the legacy prompt (no control otherwise); False → none."""
    if control is None:
        return (DEFAULT_CONTROL_PROMPT, DEFAULT_CONTROL_ANSWER) if prompt == DEFAULT_PROMPT else None
    if control is False:
        return None
    if control is True:
        raise ValueError("control=True is ambiguous: pass (control_prompt, control_answer)")
    return tuple(control)


def chat_text(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn in the tokenizer's chat template, with its generation prompt,
    as the text the lens tokenises (a leading BOS string is dropped: ``to_tokens`` prepends BOS).

    Raises:
        ValueError: the tokenizer has no chat template (one line).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat: the tokenizer ({type(tokenizer).__name__}, "
                         f"{getattr(tokenizer, 'name_or_path', '?')}) has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def few_shot(examples: Sequence[tuple[str, str]], query: str,
             template: str = "{source}: {target}", separator: str = "\n") -> str:
    """A few-shot prompt: each ``(source, target)`` example written by ``template``, one per
    ``separator``, then the query written up to where its target would begin.

        few_shot([("fleur", "Blume")], "livre", 'Français: "{source}" - Deutsch: "{target}"')
        # 'Français: "fleur" - Deutsch: "Blume"\\nFrançais: "livre" - Deutsch: "'

    ``ValueError`` unless ``template`` names ``{source}`` and ``{target}`` once each.
    """
    if template.count("{source}") != 1 or template.count("{target}") != 1:
        raise ValueError(f"few_shot: the template must hold {{source}} and {{target}} once each, got {template!r}")
    head, _ = template.split("{target}")
    lines = [template.format(source=source, target=target) for source, target in examples]
    return separator.join([*lines, head.format(source=query)])
