"""The command line of ``run.py``: flags → a validated, frozen ``ExperimentConfig`` (no torch).

Every usage error is found here, before any model work: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from layers_core.collapse_rules import COPY_MARGIN, COPY_THRESHOLD
from layers_core.lens.views import LENS_CHOICES, LOGIT, NORM_VIEWS, single_file_in, view
from layers_core.pipeline.prompts import DEFAULT_ANSWER, DEFAULT_PROMPT
from layers_core.results.plots import HEATMAP_WINDOW
from layers_core.run_dir import DEFAULT_KEEP_RUNS, check_writable_dir

DESCRIPTION = "Layer-by-layer logit-lens sweep"
RUN_PROG = "run.py"  # the design card's entry; the console command passes "layers-and-logits run"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAP_CHOICES = ("auto", "balanced", "sequential")


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one invocation; the single home of the defaults."""

    device: str = "auto"  # auto = cuda, then mps, then cpu
    fp32_unembed: bool = False  # float32 shadow copy of W_U/b_U for the analysis
    keep_residuals: bool = False  # dump each layer's normalised residual as .pt
    copy_threshold: float = COPY_THRESHOLD
    copy_margin: float = COPY_MARGIN
    copy_entropy_fallback: bool = True  # entropy < 1 bit also counts as copy collapse
    norm_strategy: str = "final"  # final (the standard logit lens) | arch (the seed's rule) | none
    out_dir: str | None = None  # None = managed run-latest/ next to run.py
    self_test: bool = False  # last-layer consistency gate only; writes nothing
    prompt: str = DEFAULT_PROMPT
    answer: str | None = DEFAULT_ANSWER  # None (--prompt without --answer): no answer columns
    quiet: bool = False  # only errors and verdicts on the console
    plots: bool = True  # lens heatmap and layer curves beside the CSVs
    prompts_file: str | None = None  # JSONL prompt set: one model load, a summary CSV
    control: bool = True  # a control pass (France → Paris for the legacy prompt)
    control_prompt: str | None = None  # None = the default control for the legacy prompt
    control_answer: str | None = None
    allow_lens_mismatch: bool = False  # publish even if the last-layer check fails
    allow_foreign_lens: bool = False  # apply a fitted lens whose fingerprint names another model
    keep_runs: int = DEFAULT_KEEP_RUNS  # managed mode keeps this many run-<stamp>* directories
    threads: int | None = None  # None = one thread per core other processes leave idle
    output_name: str | None = None  # file-name stem; None = the model's folder name
    dtype: str = "auto"  # auto = float32 on CPU, the checkpoint's half dtype on GPUs
    device_map: str | None = None  # auto | balanced | sequential: spread over several GPUs
    max_memory: str | None = None  # per-GPU budget, e.g. "0=70GiB,1=70GiB"
    batch_size: int | None = None  # prompts per forward in a set; None = chosen from memory
    records: bool = False  # a set's per-position records CSV (single prompts always write it)
    shard: str | None = None  # "K/N": the prompts whose position in the file is ≡ K mod N
    resume: bool = False  # skip the prompts already checkpointed in --out_dir
    lens: str = LOGIT  # logit | a fitted lens (lens.views.FITTED_VIEWS)
    lens_path: str | None = None  # the fitted lens's file or directory; None = the model's lens cache
    chat: bool = False  # wrap the prompt in the tokenizer's chat template (one user turn)
    sublayers: bool = False  # also decode each block's residual after attention
    truncate: str = "none"  # none: a prompt longer than the context is refused; left: keep its end
    heatmap_window: int = HEATMAP_WINDOW  # the heatmap shows the last N positions of a longer prompt
    compare_lenses: bool = False  # every available lens at the last position: output-<name>-lenses.csv
    track: tuple[str, ...] = ()  # tokens followed per layer under every lens: output-<name>-tracked.csv


_DEFAULTS = ExperimentConfig()


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit 2, without the usage block or a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser(prog: str = RUN_PROG) -> argparse.ArgumentParser:
    """The CLI of ``run`` (``prog`` names it in usage and errors); defaults come from ``ExperimentConfig``."""
    p = _OneLineParser(prog=prog, description=DESCRIPTION)
    p.add_argument("model", nargs="*", help="Hugging Face hub id, local model directory, .gguf file (or a "
                   "directory holding one) or a packaged real model's name (SmolLM2-135M-Instruct, "
                   "gemma-3-270m); none = the bundled SmolLM2-135M-Instruct; several = one subprocess each")
    p.add_argument("--device", choices=DEVICE_CHOICES, default=_DEFAULTS.device,
                   help="compute device to run on (default: auto = cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=_DEFAULTS.dtype,
                   help="compute dtype (default: auto = float32 on CPU; on GPUs the checkpoint's "
                        "declared bf16/fp16, never fp16 for a bf16 checkpoint)")
    p.add_argument("--device-map", choices=DEVICE_MAP_CHOICES,
                   help="spread the model over several CUDA GPUs (accelerate's device map)")
    p.add_argument("--max-memory", metavar="GPU=SIZE,...",
                   help="per-GPU memory budget for --device-map, e.g. 0=70GiB,1=70GiB (GPUs only)")
    p.add_argument("--fp32-unembed", action="store_true",
                   help="Up-cast the model's un-embedding matrix to float32")
    p.add_argument("--keep-residuals", action="store_true",
                   help="Dump full residual tensors; if absent, keep only per-layer logits")
    p.add_argument("--copy-threshold", type=float, default=_DEFAULTS.copy_threshold,
                   help="Minimum P(top-1) for copy collapse")
    p.add_argument("--copy-margin", type=float, default=_DEFAULTS.copy_margin,
                   help="Require P(top-1) − P(top-2) > margin for copy collapse")
    p.add_argument("--no-copy-entropy-fallback", action="store_true",
                   help="Do not count entropy < 1 bit as copy collapse")
    p.add_argument("--norm", choices=NORM_VIEWS, default=_DEFAULTS.norm_strategy,
                   help="Norm applied before unembedding each layer (default: final = ln_final at every "
                        "layer, the standard logit lens; arch = the seed's next-block rule)")
    p.add_argument("--lens", choices=LENS_CHOICES, default=_DEFAULTS.lens,
                   help="logit lens, or a lens fitted by `layers-and-logits fit`: tuned, or jacobian (then the "
                        "logit lens under --norm is written beside it)")
    p.add_argument("--lens-path", metavar="PATH",
                   help="the fitted lens: a tuned lens's directory, a Jacobian lens's .pt file (or a "
                        "directory holding one); default: the lens cache `layers-and-logits fit` writes for the "
                        "model")
    p.add_argument("--compare-lenses", action="store_true",
                   help="decode the last position through every available lens (final, arch, none, and "
                        "tuned/jacobian where fitted): output-<name>-lenses.csv, a picture, milestones")
    p.add_argument("--track", nargs="+", metavar="TOKEN", default=None,
                   help="tokens to follow (e.g. ' Paris'): their rank and probability per layer under "
                        "every lens of the run, output-<name>-tracked.csv")
    p.add_argument("--sublayers", action="store_true",
                   help="also decode each block's residual after its attention, before its MLP "
                        "(rows with sublayer=attn; not for parallel blocks)")
    p.add_argument("--truncate", choices=("none", "left"), default=_DEFAULTS.truncate,
                   help="a prompt longer than the model's context: refuse it (none, the default) or keep "
                        "its last tokens (left; recorded in the JSON)")
    p.add_argument("--heatmap-window", type=int, default=_DEFAULTS.heatmap_window, metavar="N",
                   help="the lens heatmap shows the last N positions (the records CSV keeps all)")
    p.add_argument("--prompt", help="Override the prompt (without --answer: the lens rows, no answer columns)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn in the tokenizer's chat template (with its "
                        "generation prompt); the answer is scored as the assistant's first token(s)")
    p.add_argument("--answer", help=f"Gold answer of --prompt (default prompt: {_DEFAULTS.answer})")
    p.add_argument("--out_dir", "--out-dir", dest="out_dir",
                   help="Output directory to save CSV & JSON results "
                        "(default: managed run-latest next to run.py)")
    p.add_argument("--name", dest="output_name", metavar="NAME",
                   help="File-name stem of the outputs (default: the model's folder name)")
    p.add_argument("--self-test", action="store_true",
                   help="Check that the last-layer lens reproduces the model's logits "
                        "(KL <= 1e-6 bits, float32); writes nothing")
    p.add_argument("--allow-lens-mismatch", action="store_true",
                   help="Publish the results even if the last-layer check fails")
    p.add_argument("--allow-foreign-lens", action="store_true",
                   help="apply a fitted lens even if its fingerprint (config.json and W_U hashes) names "
                        "another model")
    p.add_argument("--quiet", action="store_true", help="Print only errors and the final verdict")
    p.add_argument("--no-plots", action="store_true",
                   help="Do not draw the lens heatmap and layer-curve PNGs")
    p.add_argument("--prompts", metavar="FILE.jsonl",
                   help="Prompt set: one JSON object per line with prompt, answer and an "
                        "optional id (and control_prompt/control_answer)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="prompts per forward pass in a prompt set (default: chosen from memory; "
                        "1 = one prompt at a time)")
    p.add_argument("--records", action="store_true",
                   help="also write the per-position records CSV for a prompt set")
    p.add_argument("--shard", metavar="K/N|auto",
                   help="run only the prompts whose 0-based position in the file is K mod N "
                        "(requires --out_dir; join shards with `layers-and-logits merge`); auto: K/N from "
                        "torchrun (RANK/WORLD_SIZE; rank 0 then merges into --out_dir) or Slurm, each shard "
                        "writing --out_dir/shard-K-of-N/")
    p.add_argument("--resume", action="store_true",
                   help="skip the prompts of a set already finished in --out_dir (checkpointed "
                        "per batch)")
    p.add_argument("--control-prompt", help="Control prompt (requires --control-answer; "
                   "default: the France → Paris version of the legacy prompt)")
    p.add_argument("--control-answer", help="Gold answer of the control prompt")
    p.add_argument("--no-control", action="store_true", help="Skip the control pass")
    p.add_argument("--keep-runs", type=int, default=_DEFAULTS.keep_runs, metavar="N",
                   help=f"Keep the newest N run-<stamp> directories (default {DEFAULT_KEEP_RUNS})")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: one per core that other processes leave idle, "
                        "measured at start-up)")
    return p


def _check(args: argparse.Namespace) -> str | None:
    """The first usage error in ``args``, or None."""
    if args.answer is not None and args.prompt is None:
        return "--answer requires --prompt (it is the gold answer of that prompt)"
    for flag, value in (("--prompt", args.prompt), ("--answer", args.answer)):
        if value is not None and not value.strip():
            return f"{flag} must not be empty"
    if not 0.0 < args.copy_threshold <= 1.0:
        return f"--copy-threshold must be in (0, 1], got {args.copy_threshold}"
    if not 0.0 <= args.copy_margin < 1.0:
        return f"--copy-margin must be in [0, 1), got {args.copy_margin}"
    if (args.control_prompt is None) != (args.control_answer is None):
        return "--control-prompt and --control-answer go together"
    if args.no_control and args.control_prompt is not None:
        return "--no-control and --control-prompt exclude each other"
    if args.lens_path is not None and args.lens == LOGIT:
        return f"--lens-path goes with a fitted lens (--lens {' | '.join(LENS_CHOICES[1:])})"
    if args.lens_path is not None and view(args.lens).single_file:
        if single_file_in(args.lens_path) is None:
            return (f"--lens-path {args.lens_path}: no {args.lens} lens there (a .pt file, or a directory "
                    "holding exactly one); fit one with `layers-and-logits fit --kind jacobian`")
    elif args.lens_path is not None:
        missing = [name for name in view(args.lens).files
                   if not os.path.isfile(os.path.join(args.lens_path, name))]
        if missing:
            return (f"--lens-path {args.lens_path}: no {args.lens} lens there (missing {', '.join(missing)}); "
                    "fit one with `layers-and-logits fit`")
    if args.heatmap_window < 1:
        return f"--heatmap-window must be at least 1, got {args.heatmap_window}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be at least 1, got {args.threads}"
    if args.max_memory is not None:
        if args.device_map is None:
            return "--max-memory goes with --device-map"
        try:
            parse_max_memory(args.max_memory)
        except ValueError as error:
            return str(error)
    if args.device_map is not None and args.device in ("cpu", "mps"):
        return f"--device-map spreads a model over CUDA GPUs, not --device {args.device}"
    if args.keep_runs < 0:
        return f"--keep-runs must be at least 0, got {args.keep_runs}"
    if args.output_name is not None and len(args.model) > 1:
        return "--name applies to one model; several models get distinct names automatically"
    for flag, value in (("--batch-size", args.batch_size), ("--shard", args.shard),
                        ("--resume", args.resume or None), ("--records", args.records or None)):
        if value is not None and args.prompts is None:
            return f"{flag} applies to a prompt set (--prompts)"
    if args.batch_size is not None and args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    for flag, on in (("--shard", args.shard is not None), ("--resume", args.resume)):
        if on and args.out_dir is None:
            return f"{flag} requires --out_dir"
    if args.shard is not None:
        from layers_core.results.prompt_sets import AUTO_SHARD, resolve_shard

        try:
            resolve_shard(args.shard, os.environ)
        except ValueError as error:
            return str(error)
        if args.shard == AUTO_SHARD and len(args.model) > 1:
            return "--shard auto runs one model per launch (start one job per model)"
    if args.prompts is not None:
        for flag, on in (("--prompt", args.prompt is not None), ("--self-test", args.self_test),
                         ("--chat", args.chat),
                         ("--sublayers", args.sublayers), ("--compare-lenses", args.compare_lenses),
                         ("--track", bool(args.track)), ("--keep-residuals", args.keep_residuals)):
            if on:
                return f"--prompts and {flag} exclude each other"
        from layers_core.results.prompt_sets import load_prompt_set

        try:  # a malformed set fails here, with its line number, before any model work
            load_prompt_set(args.prompts)
        except ValueError as error:
            return str(error)
    if args.out_dir is not None and not args.self_test:
        return check_writable_dir(args.out_dir)
    return None


def parse_config(argv: list[str] | None = None, prog: str = RUN_PROG) -> tuple[list[str], ExperimentConfig]:
    """``(models, config)`` from the command line; usage errors exit 2 with one line."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        parser.error(problem)
    config = ExperimentConfig(
        device=args.device, fp32_unembed=args.fp32_unembed, keep_residuals=args.keep_residuals,
        copy_threshold=args.copy_threshold, copy_margin=args.copy_margin,
        copy_entropy_fallback=not args.no_copy_entropy_fallback, norm_strategy=args.norm,
        out_dir=args.out_dir, self_test=args.self_test,
        prompt=_DEFAULTS.prompt if args.prompt is None else args.prompt,
        answer=(_DEFAULTS.answer if args.prompt is None else None) if args.answer is None else args.answer,
        quiet=args.quiet,
        plots=not args.no_plots, prompts_file=args.prompts, control=not args.no_control,
        control_prompt=args.control_prompt, control_answer=args.control_answer,
        allow_lens_mismatch=args.allow_lens_mismatch, allow_foreign_lens=args.allow_foreign_lens,
        keep_runs=args.keep_runs,
        threads=args.threads, output_name=args.output_name, dtype=args.dtype,
        device_map=args.device_map, max_memory=args.max_memory, batch_size=args.batch_size,
        records=args.records, shard=args.shard, resume=args.resume, lens=args.lens,
        lens_path=args.lens_path, chat=args.chat, sublayers=args.sublayers, truncate=args.truncate,
        heatmap_window=args.heatmap_window, compare_lenses=args.compare_lenses, track=tuple(args.track or ()),
    )
    return list(args.model), config


def child_argv(config: ExperimentConfig) -> list[str]:
    """Every setting as flags, for a launcher child (the device is always passed)."""
    flags = ["--device", config.device, "--dtype", config.dtype, "--norm", config.norm_strategy,
             "--lens", config.lens,
             "--copy-threshold", repr(config.copy_threshold), "--copy-margin", repr(config.copy_margin),
             "--keep-runs", str(config.keep_runs), "--truncate", config.truncate,
             "--heatmap-window", str(config.heatmap_window)]
    switches = {"--fp32-unembed": config.fp32_unembed, "--keep-residuals": config.keep_residuals,
                "--no-copy-entropy-fallback": not config.copy_entropy_fallback,
                "--self-test": config.self_test, "--quiet": config.quiet,
                "--no-plots": not config.plots, "--no-control": not config.control,
                "--allow-lens-mismatch": config.allow_lens_mismatch,
                "--allow-foreign-lens": config.allow_foreign_lens, "--records": config.records,
                "--resume": config.resume, "--chat": config.chat, "--sublayers": config.sublayers,
                "--compare-lenses": config.compare_lenses}
    flags += [flag for flag, on in switches.items() if on]
    optional = {"--prompts": config.prompts_file, "--control-prompt": config.control_prompt,
                "--control-answer": config.control_answer,
                "--threads": None if config.threads is None else str(config.threads),
                "--device-map": config.device_map, "--max-memory": config.max_memory,
                "--batch-size": None if config.batch_size is None else str(config.batch_size),
                "--shard": config.shard, "--lens-path": config.lens_path}
    if config.prompt != _DEFAULTS.prompt or config.answer != _DEFAULTS.answer:
        optional.update({"--prompt": config.prompt, "--answer": config.answer})  # None: no answer
    for flag, value in optional.items():
        if value is not None:
            flags += [flag, value]
    if config.track:
        flags += ["--track", *config.track]
    return flags


def parse_max_memory(text: str) -> dict[int, str]:
    """``"0=70GiB,1=70GiB"`` → ``{0: "70GiB", 1: "70GiB"}``. GPU entries only: the Bridge rejects
    device maps that mix CPU or disk with GPUs."""
    budget: dict[int, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        key, _, size = entry.partition("=")
        key = key.strip().lower().removeprefix("cuda:")
        if key in ("cpu", "disk", "mps"):
            raise ValueError(f"--max-memory {entry}: GPU entries only (TransformerLens rejects device "
                             "maps that mix CPU or disk with GPUs)")
        if not key.isdigit() or not size.strip():
            raise ValueError(f"--max-memory {entry}: expected GPU=SIZE, e.g. 0=70GiB")
        budget[int(key)] = size.strip()
    if not budget:
        raise ValueError("--max-memory: expected GPU=SIZE entries, e.g. 0=70GiB,1=70GiB")
    return budget
