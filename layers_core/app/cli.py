"""The command line of ``run.py``: flags → a validated, frozen ``ExperimentConfig`` (no torch).

Every usage error is found here, before any model work: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import Any

from layers_core.collapse_rules import COPY_MARGIN, COPY_THRESHOLD
from layers_core.lens.views import LENS_CHOICES, LOGIT, NORM_VIEWS, single_file_in, view
from layers_core.pipeline.prompts import DEFAULT_ANSWER, DEFAULT_PROMPT
from layers_core.results.plots import HEATMAP_WINDOW
from layers_core.run_dir import DEFAULT_KEEP_RUNS, check_writable_dir

DESCRIPTION = "Layer-by-layer logit-lens sweep"
RUN_PROG = "run.py"  # the design card's entry; the console command passes "layers-and-logits run"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
ONE_MODEL_HELP = ("hub id, local directory, .gguf file or packaged model name (default: the bundled "
                  "SmolLM2-135M-Instruct)")  # the model argument of fit and self-test
MODEL, LENS, PROMPT, OUTPUT, COMPUTE = "model", "lens", "prompt", "output", "compute"
GROUPS = {MODEL: "the model", LENS: "the lens", PROMPT: "prompts and answers", OUTPUT: "outputs",
          COMPUTE: "compute"}


@dataclass(frozen=True)
class Flag:
    """How one ``ExperimentConfig`` field appears on the command line: its flags, help, group and
    argparse options. ``negated``: a ``--no-…`` switch that turns an on-by-default setting off.
    ``check``: the field's own usage rule (the value → an error message or None)."""

    flags: tuple[str, ...]
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    nargs: str | None = None
    negated: bool = False
    check: Callable[[Any], str | None] | None = None


def setting(default: Any, *flags: str, help: str, group: str, **options: Any) -> Any:
    """A config field declared once: its default, and (``flags``) how the command line sets it."""
    return field(default=default, metadata={"flag": Flag(tuple(flags), help, group, **options)})


def concepts_error(text: str | None) -> str | None:
    """The problem with ``--concepts`` (JSON of names to words), or None."""
    if text is None:
        return None
    import json

    from layers_core.results.prompt_sets import check_concepts

    try:
        check_concepts(json.loads(text), "--concepts")
    except json.JSONDecodeError as error:
        return f"--concepts: not valid JSON ({error.msg}); e.g. '{{\"de\": [\"Buch\"]}}'"
    except ValueError as error:
        return str(error)
    return None


def _at_least(flag: str, least: int) -> Callable[[Any], str | None]:
    return lambda value: (None if value is None or value >= least
                          else f"{flag} must be at least {least}, got {value}")


def _in_interval(flag: str, interval: str) -> Callable[[Any], str | None]:
    """``interval`` is "(0, 1]" or "[0, 1)": which end of the unit interval is open."""
    def check(value: float) -> str | None:
        inside = 0.0 < value <= 1.0 if interval == "(0, 1]" else 0.0 <= value < 1.0
        return None if inside else f"{flag} must be in {interval}, got {value}"

    return check


def _file_stem(name: str | None) -> str | None:
    """``--name`` becomes part of file names: no path separator, not empty, not a dot name."""
    if name is None:
        return None
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", os.sep)):
        return f"--name {name!r}: a file-name stem, without a path separator"
    return None


def _not_empty(flag: str) -> Callable[[Any], str | None]:
    return lambda value: None if value is None or value.strip() else f"{flag} must not be empty"


def _max_memory_error(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        parse_max_memory(text)
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one invocation, declared once: its default here, its flag, help, group and
    check as field metadata (``setting``). ``build_parser``, ``child_argv`` and the usage checks
    are generated from these fields."""

    # the model: where and in what dtype it is loaded
    device: str = setting("auto", "--device", group=MODEL, choices=DEVICE_CHOICES,
                          help="compute device to run on (default: auto = cuda, then mps, then cpu)")
    dtype: str = setting("auto", "--dtype", group=MODEL, choices=("auto", "float32", "bfloat16", "float16"),
                         help="compute dtype (default: auto = float32 on CPU; on GPUs the checkpoint's declared "
                              "bf16/fp16, never fp16 for a bf16 checkpoint)")
    device_map: str | None = setting(None, "--device-map", group=MODEL, choices=("auto", "balanced", "sequential"),
                                     help="spread the model over several CUDA GPUs (accelerate's device map)")
    max_memory: str | None = setting(None, "--max-memory", group=MODEL, metavar="GPU=SIZE,...",
                                     check=_max_memory_error,
                                     help="per-GPU memory budget for --device-map, e.g. 0=70GiB,1=70GiB "
                                          "(GPUs only)")
    # compute
    threads: int | None = setting(None, "--threads", group=COMPUTE, type=int, metavar="N",
                                  check=_at_least("--threads", 1),
                                  help="CPU threads for torch (default: one per core that other processes leave "
                                       "idle, measured at start-up)")
    fp32_unembed: bool = setting(False, "--fp32-unembed", group=COMPUTE,
                                 help="Up-cast the model's un-embedding matrix to float32")
    # the lens
    norm_strategy: str = setting("final", "--norm", group=LENS, choices=NORM_VIEWS,
                                 help="Norm applied before unembedding each layer (default: final = ln_final at "
                                      "every layer, the standard logit lens; arch = the seed's next-block rule)")
    lens: str = setting(LOGIT, "--lens", group=LENS, choices=LENS_CHOICES,
                        help="logit lens, or a lens fitted by `layers-and-logits fit`: tuned, or jacobian (then "
                             "the logit lens under --norm is written beside it) (default: logit)")
    lens_path: str | None = setting(None, "--lens-path", group=LENS, metavar="PATH",
                                    help="the fitted lens: a tuned lens's directory, a Jacobian lens's .pt file "
                                         "(or a directory holding one); default: the lens cache "
                                         "`layers-and-logits fit` writes for the model")
    allow_foreign_lens: bool = setting(False, "--allow-foreign-lens", group=LENS,
                                       help="apply a fitted lens even if its fingerprint (config.json and W_U "
                                            "hashes) names another model")
    compare_lenses: bool = setting(False, "--compare-lenses", group=LENS,
                                   help="decode the last position through every available lens (final, arch, "
                                        "none, and tuned/jacobian where fitted): output-<name>-lenses.csv, a "
                                        "picture, milestones")
    track: tuple[str, ...] = setting((), "--track", group=LENS, nargs="+", metavar="TOKEN",
                                     help="tokens to follow (e.g. ' Paris'): their rank and probability per "
                                          "layer under every lens of the run, output-<name>-tracked.csv")
    concepts: str | None = setting(None, "--concepts", group=LENS, metavar="JSON", check=concepts_error,
                                   help='named token sets, e.g. \'{"de": ["Buch"], "en": ["book"]}\': each '
                                        "one's summed probability and best rank per layer under every lens of "
                                        "the run (every token that starts a word, with and without its space), "
                                        "output-<name>-concepts.csv; in a set, items without their own")
    sublayers: bool = setting(False, "--sublayers", group=LENS,
                              help="also decode each block's residual after its attention, before its MLP "
                                   "(rows with sublayer=attn; not for parallel blocks)")
    copy_threshold: float = setting(COPY_THRESHOLD, "--copy-threshold", group=LENS, type=float, metavar="P",
                                    check=_in_interval("--copy-threshold", "(0, 1]"),
                                    help="Minimum P(top-1) for copy collapse (default: 0.9)")
    copy_margin: float = setting(COPY_MARGIN, "--copy-margin", group=LENS, type=float, metavar="P",
                                 check=_in_interval("--copy-margin", "[0, 1)"),
                                 help="Require P(top-1) − P(top-2) > margin for copy collapse (default: 0.05)")
    copy_entropy_fallback: bool = setting(True, "--no-copy-entropy-fallback", group=LENS, negated=True,
                                          help="Do not count entropy < 1 bit as copy collapse")
    # prompts and answers
    prompt: str = setting(DEFAULT_PROMPT, "--prompt", group=PROMPT, metavar="TEXT",
                          check=_not_empty("--prompt"),
                          help="Override the prompt (without --answer: the lens rows, no answer columns) "
                               "(default: the legacy prompt, 'The capital of Germany is called simply')")
    answer: str | None = setting(DEFAULT_ANSWER, "--answer", group=PROMPT, metavar="TEXT",
                                 check=_not_empty("--answer"),
                                 help=f"Gold answer of --prompt (default prompt: {DEFAULT_ANSWER})")
    aliases: tuple[str, ...] = setting((), "--alias", group=PROMPT, nargs="+", metavar="TEXT",
                                       help="more ways to write --answer ('NYC' beside 'New York'): the answer's "
                                            "rank is the best alias's, its probability their sum")
    generate: int | None = setting(None, "--generate", group=PROMPT, type=int, metavar="N",
                                   check=_at_least("--generate", 1),
                                   help="generate N tokens after the prompt (greedy; --temperature samples) and "
                                        "read where in depth each is decided: output-<name>-continuation.csv")
    continuation: str | None = setting(None, "--continuation", group=PROMPT, metavar="TEXT",
                                       check=_not_empty("--continuation"),
                                       help="teacher-forced text after the prompt, read as --generate reads a "
                                            "generation")
    temperature: float = setting(0.0, "--temperature", group=PROMPT, type=float, metavar="T",
                                 check=lambda t: None if t >= 0 else f"--temperature must be at least 0, got {t}",
                                 help="--generate: sample at this temperature (default: 0.0, greedy)")
    seed: int = setting(0, "--seed", group=PROMPT, type=int, metavar="S",
                        help="--generate --temperature: the sampling seed (default: 0)")
    chat: bool = setting(False, "--chat", group=PROMPT,
                         help="wrap the prompt as one user turn in the tokenizer's chat template (with its "
                              "generation prompt); the answer is scored as the assistant's first token(s)")
    answer_join: str = setting("auto", "--answer-join", group=PROMPT, choices=("auto", "space", "none"),
                               help="how the answer follows the prompt: auto (no space after whitespace, an "
                                    "opening quote or bracket, or Chinese/Japanese/Thai text; else a space), "
                                    "space or none (default: auto; a set's item may say its own)")
    truncate: str = setting("none", "--truncate", group=PROMPT, choices=("none", "left"),
                            help="a prompt longer than the model's context: refuse it (none) or keep its last "
                                 "tokens (left; recorded in the JSON) (default: none)")
    control: bool = setting(True, "--no-control", group=PROMPT, negated=True, help="Skip the control pass")
    control_prompt: str | None = setting(None, "--control-prompt", group=PROMPT, metavar="TEXT",
                                         help="Control prompt (requires --control-answer; default: the France → "
                                              "Paris version of the legacy prompt)")
    control_answer: str | None = setting(None, "--control-answer", group=PROMPT, metavar="TEXT",
                                         help="Gold answer of the control prompt")
    prompts_file: str | None = setting(None, "--prompts", group=PROMPT, metavar="FILE.jsonl",
                                       help="Prompt set: one JSON object per line with prompt, answer and an "
                                            "optional id (and control_prompt/control_answer)")
    batch_size: int | None = setting(None, "--batch-size", group=COMPUTE, type=int, metavar="N",
                                     check=_at_least("--batch-size", 1),
                                     help="prompts per forward pass in a prompt set (default: chosen from memory; "
                                          "1 = one prompt at a time)")
    shard: str | None = setting(None, "--shard", group=PROMPT, metavar="K/N|auto",
                                help="run only the prompts whose 0-based position in the file is K mod N "
                                     "(requires --out_dir; join shards with `layers-and-logits merge`); auto: "
                                     "K/N from torchrun (RANK/WORLD_SIZE; rank 0 then merges into --out_dir) or "
                                     "Slurm, each shard writing --out_dir/shard-K-of-N/")
    resume: bool = setting(False, "--resume", group=PROMPT,
                           help="skip the prompts of a set already finished in --out_dir (checkpointed per batch)")
    # outputs
    out_dir: str | None = setting(None, "--out_dir", "--out-dir", group=OUTPUT, metavar="DIR",
                                  help="Output directory to save CSV & JSON results (default: managed "
                                       "run-latest next to run.py)")
    output_name: str | None = setting(None, "--name", group=OUTPUT, metavar="NAME", check=_file_stem,
                                      help="File-name stem of the outputs (default: the model's folder name)")
    records: bool = setting(False, "--records", group=OUTPUT,
                            help="also write the per-position records CSV for a prompt set")
    every_position: bool = setting(True, "--no-records", group=OUTPUT, negated=True,
                                   help="a single prompt: decode only the next-token position (no records CSV; "
                                        "the heatmap is that position's column; every check still runs)")
    keep_residuals: bool = setting(False, "--keep-residuals", group=OUTPUT,
                                   help="Dump full residual tensors; if absent, keep only per-layer logits")
    plots: bool = setting(True, "--no-plots", group=OUTPUT, negated=True,
                          help="Do not draw the lens heatmap and layer-curve PNGs")
    heatmap_window: int = setting(HEATMAP_WINDOW, "--heatmap-window", group=OUTPUT, type=int, metavar="N",
                                  check=_at_least("--heatmap-window", 1),
                                  help="the lens heatmap shows the last N positions (the records CSV keeps all) "
                                       f"(default: {HEATMAP_WINDOW})")
    keep_runs: int = setting(DEFAULT_KEEP_RUNS, "--keep-runs", group=OUTPUT, type=int, metavar="N",
                             check=_at_least("--keep-runs", 0),
                             help=f"Keep the newest N run-<stamp> directories (default {DEFAULT_KEEP_RUNS})")
    quiet: bool = setting(False, "--quiet", group=OUTPUT, help="Print only errors and the final verdict")
    self_test: bool = setting(False, "--self-test", group=OUTPUT,
                              help="Check that the last-layer lens reproduces the model's logits "
                                   "(KL <= 1e-6 bits, float32); writes nothing")
    allow_lens_mismatch: bool = setting(False, "--allow-lens-mismatch", group=OUTPUT,
                                        help="Publish the results even if the last-layer check fails")


_DEFAULTS = ExperimentConfig()
UNSET = None  # argparse's value of a --prompt/--answer not given (their config defaults differ)


def flag_of(config_field: Field) -> Flag:
    """The command-line declaration of an ``ExperimentConfig`` field."""
    return config_field.metadata["flag"]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit 2, without the usage block or a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _argparse_options(config_field: Field, flag: Flag) -> dict[str, Any]:
    if isinstance(config_field.default, bool):
        return {"action": "store_false" if flag.negated else "store_true", "default": config_field.default}
    options = {key: value for key, value in (("choices", flag.choices), ("metavar", flag.metavar),
                                              ("type", flag.type), ("nargs", flag.nargs)) if value is not None}
    if config_field.name in ("prompt", "answer", "track"):  # given or not matters (see parse_config)
        return {**options, "default": UNSET}
    return {**options, "default": config_field.default}


def build_parser(prog: str = RUN_PROG) -> argparse.ArgumentParser:
    """The CLI of ``run`` (``prog`` names it in usage and errors), generated from
    ``ExperimentConfig``'s fields: one argument group per kind of setting."""
    p = OneLineParser(prog=prog, description=DESCRIPTION)
    p.add_argument("model", nargs="*", help="Hugging Face hub id, local model directory, .gguf file (or a "
                   "directory holding one) or a packaged real model's name (SmolLM2-135M-Instruct, "
                   "gemma-3-270m); none = the bundled SmolLM2-135M-Instruct; several = one subprocess each")
    groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
    for config_field in fields(ExperimentConfig):
        flag = flag_of(config_field)
        groups[flag.group].add_argument(*flag.flags, dest=config_field.name, help=flag.help,
                                        **_argparse_options(config_field, flag))
    return p


def _field_error(args: argparse.Namespace) -> str | None:
    """The first field whose own check rejects its value."""
    for config_field in fields(ExperimentConfig):
        check = flag_of(config_field).check
        problem = check(getattr(args, config_field.name)) if check is not None else None
        if problem:
            return problem
    return None


def _lens_path_error(args: argparse.Namespace) -> str | None:
    if args.lens_path is None:
        return None
    if args.lens == LOGIT:
        return f"--lens-path goes with a fitted lens (--lens {' | '.join(LENS_CHOICES[1:])})"
    if view(args.lens).single_file:
        if single_file_in(args.lens_path) is None:
            return (f"--lens-path {args.lens_path}: no {args.lens} lens there (a .pt file, or a directory "
                    "holding exactly one); fit one with `layers-and-logits fit --kind jacobian`")
        return None
    missing = [name for name in view(args.lens).files if not os.path.isfile(os.path.join(args.lens_path, name))]
    if missing:
        return (f"--lens-path {args.lens_path}: no {args.lens} lens there (missing {', '.join(missing)}); "
                "fit one with `layers-and-logits fit`")
    return None


def _prompt_set_error(args: argparse.Namespace) -> str | None:
    for flag, value in (("--batch-size", args.batch_size), ("--shard", args.shard),
                        ("--resume", args.resume or None), ("--records", args.records or None)):
        if value is not None and args.prompts_file is None:
            return f"{flag} applies to a prompt set (--prompts)"
    clashing = [flag for flag, on in (("--records", args.records), ("--prompts", args.prompts_file is not None),
                                      ("--keep-residuals", args.keep_residuals)) if on]
    if not args.every_position and clashing:
        return f"--no-records and {clashing[0]} exclude each other (a set writes no records unless --records)"
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
    if args.prompts_file is None:
        return None
    for flag, on in (("--prompt", args.prompt is not UNSET), ("--self-test", args.self_test),
                     ("--chat", args.chat), ("--sublayers", args.sublayers),
                     ("--compare-lenses", args.compare_lenses), ("--track", bool(args.track)),
                     ("--keep-residuals", args.keep_residuals), ("--generate", args.generate is not None),
                     ("--continuation", args.continuation is not None)):
        if on:
            return f"--prompts and {flag} exclude each other"
    from layers_core.results.prompt_sets import load_prompt_set

    try:  # a malformed set fails here, with its line number, before any model work
        load_prompt_set(args.prompts_file)
    except ValueError as error:
        return str(error)
    return None


def _check(args: argparse.Namespace) -> str | None:
    """The first usage error in ``args``, or None: each field's own check, then the rules that
    tie several settings together."""
    if args.answer is not UNSET and args.prompt is UNSET:
        return "--answer requires --prompt (it is the gold answer of that prompt)"
    if args.generate is not None and args.continuation is not None:
        return "--generate and --continuation exclude each other (generate text, or give it)"
    if (args.temperature or args.seed) and args.generate is None:
        return "--temperature and --seed go with --generate"
    if args.aliases and args.answer is UNSET:
        return "--alias requires --answer (it names more ways to write that answer)"
    problem = _field_error(args)
    if problem:
        return problem
    if (args.control_prompt is None) != (args.control_answer is None):
        return "--control-prompt and --control-answer go together"
    if not args.control and args.control_prompt is not None:
        return "--no-control and --control-prompt exclude each other"
    problem = _lens_path_error(args)
    if problem:
        return problem
    if args.max_memory is not None and args.device_map is None:
        return "--max-memory goes with --device-map"
    if args.device_map is not None and args.device in ("cpu", "mps"):
        return f"--device-map spreads a model over CUDA GPUs, not --device {args.device}"
    if args.output_name is not None and len(args.model) > 1:
        return "--name applies to one model; several models get distinct names automatically"
    problem = _prompt_set_error(args)
    if problem:
        return problem
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
    values = {config_field.name: getattr(args, config_field.name) for config_field in fields(ExperimentConfig)}
    given_prompt = args.prompt is not UNSET
    values["prompt"] = args.prompt if given_prompt else _DEFAULTS.prompt
    if args.answer is UNSET:  # a prompt of your own has no answer unless you name one
        values["answer"] = None if given_prompt else _DEFAULTS.answer
    values["track"] = tuple(args.track or ())
    values["aliases"] = tuple(args.aliases or ())
    return list(args.model), ExperimentConfig(**values)


NOT_FORWARDED = ("out_dir", "output_name")  # a launcher child gets its own --out_dir and --name


def child_argv(config: ExperimentConfig) -> list[str]:
    """The settings of ``config`` as flags for a launcher child, generated from the fields: each
    setting away from its default (the device always), ``--prompt``/``--answer`` together."""
    argv = ["--device", config.device]
    custom_prompt = (config.prompt, config.answer) != (_DEFAULTS.prompt, _DEFAULTS.answer)
    for config_field in fields(ExperimentConfig):
        name, flag = config_field.name, flag_of(config_field)
        value = getattr(config, name)
        if name in NOT_FORWARDED or name == "device":
            continue
        if name in ("prompt", "answer"):
            if custom_prompt and value is not None:
                argv += [flag.flags[0], value]
            continue
        if value == config_field.default:
            continue
        if isinstance(config_field.default, bool):
            argv.append(flag.flags[0])
        elif flag.nargs:
            argv += [flag.flags[0], *value]
        else:
            argv += [flag.flags[0], repr(value) if isinstance(value, float) else str(value)]
    return argv


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
