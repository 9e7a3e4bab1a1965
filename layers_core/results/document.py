"""The JSON document of a run, assembled from analysed prompts (plain dicts; no I/O).

A single-prompt document has the legacy blocks in their legacy order, then the checks; a
prompt-set document has the set, its aggregate and one entry per prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from layers_core.model.lens_model import LensModel
from layers_core.model.loading import gguf_source
from layers_core.results import report
from layers_core.results.set_document import SCHEMA_VERSION

if TYPE_CHECKING:
    from layers_core.pipeline.analysis import PromptAnalysis

TIMING_KEYS = ("startup_s", "load_s", "forward_s", "lens_s", "plots_s", "write_s")  # + total_s
CHECK_BLOCKS = ("lens_comparison", "raw_lens_check", "control_summary", "control_margins")
# single prompts; lenses with compare_lenses, concepts and continuation when asked for
OPTIONAL_BLOCKS = ("attribution", "lenses", "concepts", "continuation")


def _bos_prepended(lm: LensModel, tokens: Any) -> bool:
    bos = lm.bridge.tokenizer.bos_token_id
    return bos is not None and int(tokens[0, 0]) == bos


def lens_record(lens: Any) -> dict | None:
    """A fitted or user lens in provenance: its name, where it was read from, the fingerprint of
    the model it was fitted to (None for the logit lens)."""
    if lens is None:
        return None
    return {"name": lens.name, "path": getattr(lens, "path", None),
            "fingerprint": getattr(lens, "fingerprint", None)}


def provenance(lm: LensModel, prompt: str, started_at: datetime, argv: Sequence[str] | None = None,
               analysis: PromptAnalysis | None = None, lens: Any = None) -> dict:
    """Versions, platform and the facts of this run (device, dtype, source, ``prompt``'s tokens,
    argv); ``analysis`` if the prompt was analysed in this process (else it is tokenised here)."""
    source = lm.source
    tokens = analysis.result.tokens if analysis is not None else lm.bridge.to_tokens(prompt)
    return report.provenance_block(report.RunFacts(
        device=lm.device, dtype=lm.dtype, declared_dtype=lm.declared_dtype,
        unembed_dtype=lm.unembed.matmul_dtype, model_source=source.kind,
        model_path=source.path or getattr(lm.bridge.original_model.config, "_name_or_path", ""),
        bos_prepended=_bos_prepended(lm, tokens), n_tokens=int(tokens.shape[1]),
        started_at=started_at, argv=list(sys.argv if argv is None else argv), lens=lens_record(lens),
        gguf=gguf_source(source)[1] if source.kind == "gguf" else None))


def timing_block(timing: Mapping[str, float], total_s: float) -> dict:
    """Every stage's seconds in a fixed order (0 for stages that did not run), then the total."""
    block = {key: round(timing.get(key, 0.0), 4) for key in TIMING_KEYS}
    block["total_s"] = round(total_s, 4)
    return block


def templated_prompt(lm: LensModel, analysis: PromptAnalysis) -> str:
    """The chat-templated prompt as the model reads it: its tokens decoded, so a leading BOS
    (``<|im_start|>`` on SmolLM2, which the template text shares) is shown, not dropped."""
    return lm.bridge.tokenizer.decode(analysis.result.tokens[0].tolist())


def single_prompt_document(lm: LensModel, analysis: PromptAnalysis, prompt: str, answer: str,
                           test_prompts: list[dict], provenance_block: dict) -> dict:
    """The document of a single-prompt run (without ``timing``, which the caller appends)."""
    model_last = analysis.result.model_logits[-1]
    blocks = analysis.blocks
    return {
        "prompt": {"type": "prompt", "context_prompt": prompt, "ground_truth": answer,
                   **({"chat_template": True, "templated_prompt": templated_prompt(lm, analysis)}
                      if analysis.result.prompt != prompt else {})},
        "test_prompts": test_prompts,
        "temperature_exploration": report.temperature_entries(model_last, lm.decoder),
        "diagnostics": blocks["diagnostics"],
        "final_prediction": report.final_prediction(model_last, lm.decoder),
        "model_stats": report.model_stats(lm.bridge),
        "gold_answer": blocks["gold_answer"],
        "provenance": provenance_block,
        **{key: blocks[key] for key in CHECK_BLOCKS},
        **{key: blocks[key] for key in OPTIONAL_BLOCKS if key in blocks},
        "schema_version": SCHEMA_VERSION,
    }


def prompt_entry(prompt_id: str, prompt: str, answer: str, analysis: PromptAnalysis) -> dict:
    """One prompt of a set in the document: its id, text, length and every analysis block."""
    return {"prompt_id": prompt_id, "prompt": prompt, "answer": answer,
            # answer: gold_answer.n_tokens
            "prompt_tokens": int(analysis.result.tokens.shape[1]), **analysis.blocks}


def with_timing(document: dict, timing: Mapping[str, Any], total_s: float) -> dict:
    """``document`` with its ``timing`` block last."""
    return {**{k: v for k, v in document.items() if k != "timing"}, "timing": timing_block(timing, total_s)}
