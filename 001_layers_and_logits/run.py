"""Layer-by-layer logit-lens sweep: ``python 001_layers_and_logits/run.py [MODEL ...] [flags]``.

Thin orchestrator over ``layers_core``: parse flags into a frozen ``ExperimentConfig``, load the
model, run the sweep, write the CSVs and JSON into a staging directory and publish it as
``run-latest/``. Importing this module does nothing; torch is imported only after parsing.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
RUN_BASE_DIR = HERE  # managed run-latest/ and run-*/ live next to run.py
DESCRIPTION = "Layer-by-layer logit-lens sweep"
LEGACY_PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TIMING_KEYS = ("startup_s", "load_s", "forward_s", "lens_s", "plots_s", "write_s")  # + total_s


def _import_layers_core() -> None:
    """Puts the repo root on ``sys.path`` when ``layers_core`` is not installed (any cwd works)."""
    try:
        import layers_core  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, REPO_ROOT)


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one invocation; the single home of the defaults."""

    device: str = "auto"  # auto = cuda, then mps, then cpu
    fp32_unembed: bool = False  # float32 shadow copy of W_U/b_U for the analysis
    keep_residuals: bool = False  # dump each layer's normalised residual as .pt
    copy_threshold: float = 0.90  # = collapse_rules.COPY_THRESHOLD (checked by a test)
    copy_margin: float = 0.05  # = collapse_rules.COPY_MARGIN
    copy_entropy_fallback: bool = True  # entropy < 1 bit also counts as copy collapse
    norm_strategy: str = "arch"  # arch | final | none
    out_dir: str | None = None  # None = managed run-latest/ next to run.py
    self_test: bool = False  # last-layer consistency gate only; writes nothing
    prompt: str = LEGACY_PROMPT
    answer: str = "Berlin"
    quiet: bool = False  # only errors and verdicts on the console
    plots: bool = True  # lens heatmap and layer curves beside the CSVs
    prompts_file: str | None = None  # JSONL prompt set: one model load, a summary CSV
    control: bool = True  # a control pass (France → Paris for the legacy prompt)
    control_prompt: str | None = None  # None = the default control for the legacy prompt
    control_answer: str | None = None


_DEFAULTS = ExperimentConfig()


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit 2, without the usage block or a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The CLI; defaults come from ``ExperimentConfig``."""
    parser = _OneLineParser(prog="run.py", description=DESCRIPTION)
    parser.add_argument("model", nargs="*", help="Hugging Face model id or local model directory; "
                        "none = bundled default model; several = one subprocess each")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default=_DEFAULTS.device,
                        help="compute device to run on (default: auto = cuda, then mps, then cpu)")
    parser.add_argument("--fp32-unembed", action="store_true",
                        help="Up-cast the model's un-embedding matrix to float32")
    parser.add_argument("--keep-residuals", action="store_true",
                        help="Dump full residual tensors; if absent, keep only per-layer logits")
    parser.add_argument("--copy-threshold", type=float, default=_DEFAULTS.copy_threshold,
                        help="Minimum P(top-1) for copy collapse")
    parser.add_argument("--copy-margin", type=float, default=_DEFAULTS.copy_margin,
                        help="Require P(top-1) − P(top-2) > margin for copy collapse")
    parser.add_argument("--no-copy-entropy-fallback", action="store_true",
                        help="Do not count entropy < 1 bit as copy collapse")
    parser.add_argument("--norm", choices=["arch", "final", "none"], default=_DEFAULTS.norm_strategy,
                        help="Norm applied before unembedding each layer")
    parser.add_argument("--prompt", help="Override the prompt (requires --answer)")
    parser.add_argument("--answer", help=f"Gold answer (default: {_DEFAULTS.answer})")
    parser.add_argument("--out_dir", "--out-dir", dest="out_dir",
                        help="Output directory to save CSV & JSON results "
                             "(default: managed run-latest next to run.py)")
    parser.add_argument("--self-test", action="store_true",
                        help="Check that the last-layer lens reproduces the model's logits "
                             "(KL <= 1e-6 bits, float32); writes nothing")
    parser.add_argument("--quiet", action="store_true",
                        help="Print only errors and the final verdict")
    parser.add_argument("--no-plots", action="store_true",
                        help="Do not draw the lens heatmap and layer-curve PNGs")
    parser.add_argument("--prompts", metavar="FILE.jsonl",
                        help="Prompt set: one JSON object per line with prompt, answer and an "
                             "optional id (and control_prompt/control_answer)")
    parser.add_argument("--control-prompt", help="Control prompt (requires --control-answer; "
                        "default: the France → Paris version of the legacy prompt)")
    parser.add_argument("--control-answer", help="Gold answer of the control prompt")
    parser.add_argument("--no-control", action="store_true", help="Skip the control pass")
    return parser


def _config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ExperimentConfig:
    if args.prompt is not None and args.answer is None:
        parser.error("--prompt requires --answer")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt must not be empty")
    if args.answer is not None and not args.answer.strip():
        parser.error("--answer must not be empty")
    if not 0.0 < args.copy_threshold <= 1.0:
        parser.error(f"--copy-threshold must be in (0, 1], got {args.copy_threshold}")
    if not 0.0 <= args.copy_margin < 1.0:
        parser.error(f"--copy-margin must be in [0, 1), got {args.copy_margin}")
    if (args.control_prompt is None) != (args.control_answer is None):
        parser.error("--control-prompt and --control-answer go together")
    if args.prompts is not None:
        if args.prompt is not None:
            parser.error("--prompts and --prompt exclude each other")
        if args.keep_residuals:
            parser.error("--keep-residuals applies to single-prompt runs, not --prompts")
        try:  # a malformed set fails here, with its line number, before any model work
            from layers_core.prompt_sets import load_prompt_set

            load_prompt_set(args.prompts)
        except ValueError as error:
            parser.error(str(error))
    return ExperimentConfig(
        device=args.device, fp32_unembed=args.fp32_unembed, keep_residuals=args.keep_residuals,
        copy_threshold=args.copy_threshold, copy_margin=args.copy_margin,
        copy_entropy_fallback=not args.no_copy_entropy_fallback, norm_strategy=args.norm,
        out_dir=args.out_dir, self_test=args.self_test,
        prompt=_DEFAULTS.prompt if args.prompt is None else args.prompt,
        answer=_DEFAULTS.answer if args.answer is None else args.answer, quiet=args.quiet,
        plots=not args.no_plots, prompts_file=args.prompts, control=not args.no_control,
        control_prompt=args.control_prompt, control_answer=args.control_answer,
    )


def _say(config: ExperimentConfig, line: str) -> None:
    if not config.quiet:
        print(line, flush=True)


def _prepare_runtime(device: str) -> None:
    """Seeds and determinism (SPEC §3 step 1); the thread count is never touched."""
    import random

    import numpy as np
    import torch

    from layers_core.report import SEED

    if device == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(SEED)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class StageError(RuntimeError):
    """A failure tagged with the pipeline stage it happened in."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage, error


class _Stages:
    """Times named stages and tags exceptions with the stage they came from."""

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self._start = time.perf_counter()

    def run(self, stage: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except StageError:
            raise
        except Exception as error:
            raise StageError(stage, error) from error
        finally:
            self.timing[f"{stage}_s"] = self.timing.get(f"{stage}_s", 0.0) + time.perf_counter() - started

    def total(self) -> float:
        return time.perf_counter() - self._start


def _load(config: ExperimentConfig, source, device: str):
    import torch

    from layers_core.device_policy import (
        choose_dtype,
        should_auto_promote_unembed,
        unembed_weights_for_analysis,
    )
    from layers_core.models import load_model, peek_model_type
    from layers_core.numerics import output_logits_transform
    from layers_core.sweep import UnembedPath

    if config.self_test:
        dtype = torch.float32
    else:
        dtype = choose_dtype(device, source.model_id, peek_model_type(source) if device != "cpu" else None)
    model = load_model(source, device, dtype)
    use_fp32 = config.fp32_unembed or should_auto_promote_unembed(dtype)
    W_U, b_U = unembed_weights_for_analysis(model, use_fp32)
    unembed = UnembedPath(W_U, b_U, output_logits_transform(model), force_fp32=use_fp32)
    return model, dtype, unembed


def _prepare(model_id: str | None, config: ExperimentConfig, stages: "_Stages"):
    """Resolve the device, load the model and build the shared run context."""
    from layers_core.analysis import RunContext
    from layers_core.device_policy import resolve_device
    from layers_core.models import resolve_model_source
    from layers_core.sweep import SweepSettings, TokenDecoder

    source = resolve_model_source(model_id)
    device_warnings: list[str] = []
    device = resolve_device(config.device, device_warnings)
    for warning in device_warnings:
        print(warning, file=sys.stderr)
    _say(config, f"▶ {source.clean_name} ({source.kind}) on {device}")
    model, dtype, unembed = stages.run("load", _load, config, source, device)
    cfg = model.cfg
    _say(config, f"  load     {stages.timing['load_s']:6.2f} s  {cfg.n_layers} layers, "
                 f"d_model {cfg.d_model}, vocab {cfg.d_vocab}, {dtype}")
    settings = SweepSettings(norm_strategy=config.norm_strategy, copy_threshold=config.copy_threshold,
                             copy_margin=config.copy_margin,
                             copy_entropy_fallback=config.copy_entropy_fallback,
                             fp32_unembed=unembed.force_fp32)
    ctx = RunContext(model, source.model_id, device, dtype, unembed, settings,
                     TokenDecoder(model.tokenizer))
    return source, ctx


def _control_for(config: ExperimentConfig, prompt: str) -> tuple[str, str] | None:
    """The control pair: explicit flags, else France → Paris for the legacy prompt, else none."""
    from layers_core.prompts import DEFAULT_CONTROL_ANSWER, DEFAULT_CONTROL_PROMPT

    if not config.control:
        return None
    if config.control_prompt is not None:
        return config.control_prompt, config.control_answer
    return (DEFAULT_CONTROL_PROMPT, DEFAULT_CONTROL_ANSWER) if prompt == _DEFAULTS.prompt else None


def _provenance(ctx, source, started_at, result):
    from layers_core import report

    return report.provenance(
        device=ctx.device, dtype=ctx.dtype, model_source=source.kind,
        model_path=source.path or getattr(ctx.model.original_model.config, "_name_or_path", ""),
        bos_prepended=_bos_prepended(ctx.model, result), n_tokens=int(result.tokens.shape[1]),
        started_at=started_at, argv=sys.argv)


def _finish(document: dict, stages: "_Stages", json_path: str) -> dict:
    document["timing"] = {key: round(stages.timing.get(key, 0.0), 4) for key in TIMING_KEYS}
    document["timing"]["total_s"] = round(stages.total(), 4)
    stages.run("write", _write_json, json_path, document)
    return document


def run_experiment_for_model(model_id: str | None, output_files: dict[str, str] | None,
                             config: ExperimentConfig, stages: _Stages | None = None) -> dict:
    """Runs the sweep for one model and writes its files; returns the JSON document.

    ``output_files`` comes from ``run_dir.output_paths`` (None with ``self_test``); ``stages``
    carries timings taken before the call (``main``'s start-up). Failures are raised as
    ``StageError`` carrying the stage (load, forward, lens, plots, write).
    """
    from layers_core import outputs, report
    from layers_core.analysis import analyse_prompt
    from layers_core.sweep import self_test

    started_at = datetime.now()
    stages = stages or _Stages()
    source, ctx = _prepare(model_id, config, stages)
    if config.self_test:
        return {"last_layer_consistency": stages.run(
            "forward", self_test, ctx.model, config.prompt, config.answer, ctx.unembed)}
    if config.prompts_file is not None:
        return _run_prompt_set(source, ctx, output_files, config, stages, started_at)
    analysis = stages.run("lens", analyse_prompt, ctx, config.prompt, config.answer,
                          _control_for(config, config.prompt))
    result = analysis.result
    stages.timing.update(forward_s=result.timing["forward_s"],
                         lens_s=stages.timing["lens_s"] - result.timing["forward_s"])
    test_prompts = stages.run("forward", report.test_prompt_entries, ctx.model, ctx.decoder)
    _say(config, f"  forward  {stages.timing['forward_s']:6.2f} s  {result.tokens.shape[1]} tokens, "
                 f"then {len(test_prompts)} test prompts in one batch")
    model_last = result.model_logits[-1]
    blocks = analysis.blocks
    document = {
        "prompt": {"type": "prompt", "context_prompt": config.prompt, "ground_truth": config.answer},
        "test_prompts": test_prompts,
        "temperature_exploration": report.temperature_entries(model_last, ctx.decoder),
        "diagnostics": blocks["diagnostics"],
        "final_prediction": report.final_prediction(model_last, ctx.decoder),
        "model_stats": report.model_stats(ctx.model),
        "gold_answer": blocks["gold_answer"],
        "provenance": _provenance(ctx, source, started_at, result),
        **{key: blocks[key] for key in ("lens_comparison", "raw_lens_check", "control_summary",
                                        "control_margins")},
    }
    diag = document["diagnostics"]
    _say(config, f"  lens     {stages.timing['lens_s']:6.2f} s  norm={config.norm_strategy}; "
                 f"copy rule p1>{config.copy_threshold} & margin>{config.copy_margin}"
                 f"{' (+H<1 bit)' if config.copy_entropy_fallback else ''}; "
                 f"L_copy={diag['L_copy']} L_semantic={diag['L_semantic']}; "
                 f"last-layer KL {analysis.consistency['kl_bits']:.2e} bits; "
                 f"lens-artifact risk {document['raw_lens_check']['lens_artifact_risk']}")
    stages.run("write", outputs.write_tables, output_files, [("", analysis)], source.clean_name)
    if config.keep_residuals:
        stages.run("write", outputs.write_residuals, output_files["dir"], source.clean_name,
                   result.resid_normed)
    if config.plots:
        title = f"{diag['model']} — {config.norm_strategy} lens — {config.prompt!r}"
        stages.run("plots", outputs.write_prompt_pictures, output_files, analysis, diag, title)
    _finish(document, stages, output_files["json"])
    if config.plots:
        _say(config, f"  plots    {stages.timing['plots_s']:6.2f} s  lens heatmap, layer curves")
    _say(config, f"  write    {stages.timing['write_s']:6.2f} s  "
                 f"{os.path.basename(output_files['json'])}, CSVs")
    return document


def _run_prompt_set(source, ctx, output_files, config, stages, started_at) -> dict:
    """Every prompt of ``--prompts`` through the one loaded model; per-prompt rows, a summary."""
    from layers_core import outputs, prompt_sets, report
    from layers_core.analysis import analyse_prompt

    items = prompt_sets.load_prompt_set(config.prompts_file)
    analyses, entries, summary = [], [], []
    for index, item in enumerate(items, start=1):
        control = None if item.control_prompt is None else (item.control_prompt, item.control_answer)
        analysis = stages.run("lens", analyse_prompt, ctx, item.prompt, item.answer, control)
        analyses.append((item.prompt_id, analysis))
        n_tokens = int(analysis.result.tokens.shape[1])
        summary.append(prompt_sets.summary_row(item, n_tokens, analysis.blocks["diagnostics"],
                                               analysis.result.pure_rows))
        entries.append({"prompt_id": item.prompt_id, "prompt": item.prompt, "answer": item.answer,
                        "n_tokens": n_tokens, **analysis.blocks})
        _say(config, f"  [{index}/{len(items)}] {item.prompt_id}: "
                     f"L_semantic={summary[-1]['L_semantic']} final top-1 {summary[-1]['final_top1']!r}")
    document = {
        "prompt_set": {"path": os.path.abspath(config.prompts_file), "count": len(items)},
        "aggregate": prompt_sets.aggregate(summary),
        "prompts": entries,
        "model_stats": report.model_stats(ctx.model),
        "provenance": _provenance(ctx, source, started_at, analyses[0][1].result),
    }
    stages.run("write", outputs.write_tables, output_files, analyses, source.clean_name)
    title = f"{ctx.model_id} — {config.norm_strategy} lens — {len(summary)} prompts"
    stages.run("write", outputs.write_summary, output_files, summary)
    if config.plots:
        stages.run("plots", outputs.write_summary_picture, output_files, summary,
                   int(ctx.model.cfg.n_layers), title)
    return _finish(document, stages, output_files["json"])


def _bos_prepended(model, result) -> bool:
    bos = model.tokenizer.bos_token_id
    return bos is not None and int(result.tokens[0, 0]) == bos


def _write_json(path: str, document: dict) -> None:
    from layers_core.outputs import write_json

    write_json(path, document)


def _run_single(model_id: str | None, config: ExperimentConfig, stages: _Stages) -> int:
    """One model in-process: staging → sweep → publish (or the error document)."""
    from layers_core import report
    from layers_core.models import resolve_model_source
    from layers_core.run_dir import create_staging_dir, output_paths, publish_staging_dir

    source = resolve_model_source(model_id)
    managed = config.out_dir is None and not config.self_test
    if config.self_test:
        directory = None
    elif managed:
        directory = create_staging_dir(RUN_BASE_DIR)
    else:
        os.makedirs(config.out_dir, exist_ok=True)
        directory = config.out_dir
    files = None if directory is None else output_paths(directory, source.clean_name)
    try:
        document = run_experiment_for_model(model_id, files, config, stages)
    except StageError as failure:
        print(f"❌ {source.clean_name}: {failure.stage} failed: "
              f"{type(failure.error).__name__}: {report.first_line(failure.error)}", file=sys.stderr)
        if files is not None:
            _write_json(files["json"], report.error_document(
                failure.error, failure.stage, source.model_id, datetime.now(),
                {"model_source": source.kind, "model_path": source.path, "argv": sys.argv}))
            if managed:
                where = publish_staging_dir(directory, RUN_BASE_DIR, success=False)
                print(f"   error document: {os.path.join(where, os.path.basename(files['json']))}",
                      file=sys.stderr)
        return EXIT_FAILED
    if config.self_test:
        return _self_test_verdict(document["last_layer_consistency"])
    where = publish_staging_dir(directory, RUN_BASE_DIR, success=True) if managed else directory
    print(f"✅ {source.clean_name}: results in {where}")
    return EXIT_OK


def _self_test_verdict(consistency: dict) -> int:
    from layers_core.sweep import self_test_verdict

    passed, line = self_test_verdict(consistency)
    print(line)
    return EXIT_OK if passed else EXIT_FAILED


def _forwarded_flags(config: ExperimentConfig) -> list[str]:
    """Every non-default flag, for launcher children (the device is always passed)."""
    flags = ["--device", config.device, "--norm", config.norm_strategy,
             "--copy-threshold", repr(config.copy_threshold), "--copy-margin", repr(config.copy_margin)]
    switches = {"--fp32-unembed": config.fp32_unembed, "--keep-residuals": config.keep_residuals,
                "--no-copy-entropy-fallback": not config.copy_entropy_fallback,
                "--self-test": config.self_test, "--quiet": config.quiet,
                "--no-plots": not config.plots, "--no-control": not config.control}
    flags += [flag for flag, on in switches.items() if on]
    if config.prompt != _DEFAULTS.prompt or config.answer != _DEFAULTS.answer:
        flags += ["--prompt", config.prompt, "--answer", config.answer]
    if config.prompts_file is not None:
        flags += ["--prompts", os.path.abspath(config.prompts_file)]
    if config.control_prompt is not None:
        flags += ["--control-prompt", config.control_prompt, "--control-answer", config.control_answer]
    return flags


def _launch(models: list[str], config: ExperimentConfig) -> int:
    """≥ 2 models: one child process each, all writing into one staging dir (SPEC §6.2)."""
    from layers_core.models import clean_model_name
    from layers_core.run_dir import create_staging_dir, output_paths, publish_staging_dir

    managed = config.out_dir is None and not config.self_test
    directory = create_staging_dir(RUN_BASE_DIR) if managed else config.out_dir
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    from tqdm import tqdm

    outcomes = []
    started = time.perf_counter()
    for index, model in enumerate(models, start=1):
        bar = tqdm.format_meter(index - 1, len(models), time.perf_counter() - started, ncols=70,
                                prefix="models")
        _say(config, f"{bar}  next: {model}")
        command = [sys.executable, os.path.abspath(__file__), *_forwarded_flags(config)]
        if directory is not None:
            command += ["--out_dir", directory]
        rc = subprocess.call(command + [model])
        if rc != EXIT_OK and directory is not None:
            _ensure_error_document(output_paths(directory, clean_model_name(model))["json"], model, rc)
        outcomes.append((model, rc))
    for model, rc in outcomes:
        mark, word = ("✅", "SUCCESS") if rc == EXIT_OK else ("❌", "FAILED")
        print(f"{mark} {clean_model_name(model)}: {word} (exit {rc})")
    succeeded = any(rc == EXIT_OK for _, rc in outcomes)
    if managed:
        print(f"results in {publish_staging_dir(directory, RUN_BASE_DIR, success=succeeded)}")
    return EXIT_OK if all(rc == EXIT_OK for _, rc in outcomes) else EXIT_FAILED


def _ensure_error_document(path: str, model: str, rc: int) -> None:
    """A child that died without leaving valid JSON gets an error document written for it."""
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
        return
    except (OSError, ValueError):
        pass
    from layers_core.report import error_document

    error = RuntimeError(f"child process exited with code {rc} without writing its results")
    _write_json(path, error_document(error, "load", model, datetime.now(), {"argv": sys.argv}))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 run/self-test failure, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _import_layers_core()
    config = _config_from_args(parser, args)
    if len(args.model) >= 2:
        return _launch(args.model, config)
    stages = _Stages()
    stages.run("startup", _prepare_runtime, config.device)
    return _run_single(args.model[0] if args.model else None, config, stages)


if __name__ == "__main__":
    exit_code = main()
    # Everything left is freed by the OS at exit. Without this the interpreter's final garbage
    # collections walk the object graph of torch, transformers and TransformerLens: ≈ 1 s here.
    # Only as a script: in-process callers (tests, notebooks) keep a normal collector.
    gc.freeze()
    sys.exit(exit_code)
