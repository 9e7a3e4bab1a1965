"""layers_core: the reusable pieces of the layer-by-layer logit lens.

    import layers_core as lc
    s = lc.sweep(lc.load(), "The capital of France is", "Paris")   # s.pure, s.lens_figure(), s.save(dir)

The public API is served lazily (PEP 562), so ``import layers_core`` loads no torch and
``from layers_core import kl_bits`` imports only the module that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.4.0"  # the package version (pyproject.toml reads it here); CHANGELOG.md says what changed

_EXPORTS = {
    "model.lens_model": ["LensModel", "load"],
    "api.prompt": ["Sweep", "sweep"],
    "api.prompt_set": ["SweepSet", "sweep_set"],
    "api.evaluate": ["Evaluation", "evaluate"],
    "results.tables": ["read_csv", "frame_from_rows"],
    "norm_utils": ["apply_norm_or_skip", "classify_norm", "unwrap_norm", "detect_model_architecture",
                   "get_correct_norm_module", "norm_module_label"],
    "numerics": ["bits_entropy_from_logits", "safe_cast_for_unembed", "kl_bits", "answer_rank",
                 "get_post_unembed_transform", "apply_post_unembed_transform", "unembed_logits",
                 "output_logits_transform"],
    "csv_io": ["TOP_K_RECORD", "TOP_K_VERBOSE", "IMPORTANT_WORDS", "NEXT_TOKEN_LABEL",
               "records_header", "pure_header", "is_verbose_position", "write_csv_files"],
    "collapse_rules": ["detect_copy_collapse", "is_entropy_collapse", "is_semantic_top1",
                       "resolve_gold_answer", "summarize_collapse", "compute_milestones"],
    "device_policy": ["resolve_device", "choose_dtype", "should_auto_promote_unembed",
                      "unembed_weights_for_analysis"],
    "model.loading": ["ModelSource", "clean_model_name", "resolve_model_source", "ensure_default_model",
               "load_model"],
    "hooks": ["residual_hook_names", "build_cache_hook", "attach_residual_hooks", "detach_hooks",
              "residual_cache"],
    "run_dir": ["setup_run_latest_directory", "rotate_run_latest", "create_staging_dir",
                "publish_staging_dir", "atomic_write", "unique_path"],
    "lens.protocol": ["Lens", "NormLens", "lens_norm_plan"],
    "lens.unembed": ["Unembedding"],
    "lens.views": ["VIEWS", "View"],
    "lens.tuned": ["TunedLens"],
    "lens.stats": ["LensStats", "lens_statistics"],
    "model.tokens": ["TokenDecoder", "token_set"],
    "pipeline.sweep": ["SweepSettings", "run_sweep", "last_layer_consistency",
                 "self_test"],
    "pipeline.checks": ["compare_lenses", "raw_lens_check", "control_margins"],
    "pipeline.analysis": ["analyse_prompt"],
    "results.prompt_sets": ["PromptItem", "parse_prompt_set", "load_prompt_set"],
    "pipeline.prompts": ["DEFAULT_PROMPT", "DEFAULT_ANSWER", "few_shot"],
    "results.plots": ["lens_heatmap", "layer_curves", "prompt_set_summary", "save_figure"],
}
_OWNER = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_OWNER)


def __getattr__(name: str) -> Any:
    module = _OWNER.get(name)
    if module is None:
        raise AttributeError(f"module 'layers_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"layers_core.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
