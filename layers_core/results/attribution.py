"""The direct logit attribution as files: its CSV rows and its JSON block (plain data; the split
itself is computed by ``pipeline.attribution``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layers_core.pipeline.attribution import Attribution

TOP_PARTS = 3  # the JSON block's largest parts, by |logit|


def attribution_rows(attribution: Attribution) -> list[dict]:
    """The CSV rows: ``layer, component, logit, cumulative`` (and the ``_vs_control`` pair)."""
    rows, total, total_vs = [], 0.0, 0.0
    with_control = attribution.head_logit_vs_control is not None
    for layer, component, value, vs in attribution.parts:
        total += value
        row = {"layer": layer, "component": component, "logit": value, "cumulative": total}
        if with_control:
            total_vs += vs
            row.update(logit_vs_control=vs, cumulative_vs_control=total_vs)
        rows.append(row)
    return rows


def attribution_block(attribution: Attribution | None, note: str | None, answer: str | None,
                      control_answer: str | None) -> dict:
    """The JSON's ``attribution``: the three largest parts (by |logit|), the totals and the
    residual error; or the note that says why there is none."""
    if attribution is None:
        return {"note": note}
    largest = sorted(attribution.parts, key=lambda part: -abs(part[2]))[:TOP_PARTS]
    block = {
        "answer": answer, "position": "last", "head_logit": attribution.head_logit, "b_U": attribution.bias,
        "sum_of_parts": attribution.head_logit - attribution.bias - attribution.residual_error,
        "residual_error": attribution.residual_error,
        "largest_parts": [{"layer": layer, "component": component, "logit": value}
                          for layer, component, value, _ in largest],
        "note": note,
    }
    if attribution.head_logit_vs_control is not None:
        block["control_answer"] = control_answer
        block["head_logit_vs_control"] = attribution.head_logit_vs_control
    return block
