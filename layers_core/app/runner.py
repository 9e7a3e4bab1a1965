"""One model, in-process, as ``run.py`` runs it: stages, staging, publishing, the exit code.

Owns the console of a run (progress lines, the one-line verdicts) and turns every failure into a
strict-JSON error document and exit code 1; nothing here parses flags.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from layers_core import threads
from layers_core.app import collector
from layers_core.app.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ExperimentConfig
from layers_core.lens.fingerprint import UnfingerprintedLensWarning
from layers_core.model.loading import ModelLoadError, ModelSource, clean_model_name, resolve_model_source
from layers_core.run_dir import (
    PublishError,
    RunLockedError,
    create_staging_dir,
    model_lock,
    output_paths,
    prune_runs,
    publish_model_files,
    publish_staging_dir,
    remove_stale_staging,
    rotation_target,
    signals_deferred,
)

CUBLAS_WORKSPACE = ":4096:8"  # deterministic cuBLAS without the 1 MiB-workspace warning of :16:8


def named_source(model_id: str | None) -> ModelSource:
    """The model's source; where the argument cannot be resolved (a directory holding two .gguf
    files), a stand-in named after it, so that the load stage reports the error in one line and
    leaves an error document instead of a traceback."""
    try:
        return resolve_model_source(model_id)
    except ModelLoadError:
        path = os.path.abspath(os.path.expanduser(model_id or ""))
        local = os.path.isdir(path)
        return ModelSource("local_dir" if local else "hf_id", model_id or "", path if local else None,
                           clean_model_name(model_id or ""))


class StageError(RuntimeError):
    """A failure tagged with the pipeline stage it happened in."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage, error


class LensMismatchError(RuntimeError):
    """The last-layer lens does not reproduce the model's own logits."""


class Stages:
    """Times named stages (``<stage>_s``) and tags exceptions with the stage they came from."""

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self.clock_start = time.perf_counter()

    def run(self, stage: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except (StageError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise StageError(stage, error) from error
        finally:
            self.timing[f"{stage}_s"] = self.timing.get(f"{stage}_s", 0.0) + time.perf_counter() - started


def say(config: ExperimentConfig, line: str) -> None:
    """A progress line on stdout, unless ``--quiet``."""
    if not config.quiet:
        print(line, flush=True)


def prepare_runtime(device: str) -> None:
    """Seeds (316) and deterministic algorithms; imports torch."""
    import random

    import numpy as np
    import torch

    from layers_core.results.report import SEED

    if device in ("auto", "cuda"):
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(SEED)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _thread_count(config: ExperimentConfig, before: threads.CpuSnapshot | None) -> int | None:
    """``--threads``, else torch's default minus the cores other processes kept busy while torch
    was imported (None: leave torch's choice)."""
    if config.threads is not None:
        return config.threads
    import torch

    busy = threads.busy_cores_of_others(before, threads.snapshot())
    chosen = threads.threads_for(busy, threads.available_cores(), torch.get_num_threads())
    if chosen != torch.get_num_threads():
        say(config, f"  threads  {chosen} (other processes keep {busy:.1f} cores busy; --threads overrides)")
    return chosen


def _load(config: ExperimentConfig, model_id: str | None) -> Any:
    from layers_core.app.cli import parse_max_memory
    from layers_core.model.gguf_models import CacheRepairWarning
    from layers_core.model.lens_model import load

    dtype = "float32" if config.self_test and config.dtype == "auto" else config.dtype
    max_memory = None if config.max_memory is None else parse_max_memory(config.max_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheRepairWarning)
        lm = load(model_id, device=config.device, dtype=dtype, fp32_unembed=config.fp32_unembed,
                  device_map=config.device_map, max_memory=max_memory)
    lm.threads = None  # the run set torch's threads itself (--threads, or the idle cores at start-up)
    for warning in caught:
        if issubclass(warning.category, CacheRepairWarning):
            print(f"⚠️  {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return lm


def _sweep_settings(config: ExperimentConfig) -> Any:
    """The command line's switches as the engine's ``SweepSettings`` (the one mapping)."""
    from layers_core.pipeline.sweep import SweepSettings

    return SweepSettings(norm_strategy=config.norm_strategy, copy_threshold=config.copy_threshold,
                         copy_margin=config.copy_margin, copy_entropy_fallback=config.copy_entropy_fallback,
                         lens_path=config.lens_path, allow_foreign_lens=config.allow_foreign_lens,
                         chat=config.chat, truncate=None if config.truncate == "none" else config.truncate,
                         answer_join=config.answer_join,
                         sublayers=config.sublayers, compare_lenses=config.compare_lenses, track=config.track,
                         records=(config.records or None) if config.every_position else False,  # None: all
                         batch_size=config.batch_size,
                         concepts=None if config.concepts is None else json.loads(config.concepts),
                         continuation=config.continuation, generate=config.generate,
                         temperature=config.temperature, seed=config.seed)


def _control(config: ExperimentConfig) -> Any:
    if not config.control:
        return False
    return None if config.control_prompt is None else (config.control_prompt, config.control_answer)


def _gate(config: ExperimentConfig, consistency: dict) -> None:
    """The pipeline's own last-layer check (``ln_final``) is the gate; a chosen lens that changes
    the last layer is only reported (``lens_mismatch_line``)."""
    if consistency["pipeline_passed"] or config.allow_lens_mismatch:
        return
    raise LensMismatchError(
        "the last-layer lens does not reproduce the model's logits: "
        f"KL {consistency['pipeline_kl_bits']:.3e} "
        f"bits > {consistency['tolerance_bits']:g} ({consistency['compute_dtype']}); "
        "no result is trustworthy (--allow-lens-mismatch publishes anyway)")


def lens_mismatch_line(consistency: dict) -> str | None:
    """The warning for a chosen lens whose last layer is not the model's (the pipeline's is)."""
    if consistency["passed"]:
        return None
    return (f"⚠️  the {consistency.get('lens', 'chosen')} lens does not reproduce the model at the last layer: "
            f"KL(model‖lens) {consistency['kl_model_to_lens_bits']:.3e} bits > {consistency['tolerance_bits']:g}; "
            "its last rows are the lens's, not the model's")


def _lens_line(config: ExperimentConfig, result: Any) -> str:
    diag = result.diagnostics
    return (f"  lens     {result.timing['lens_s']:6.2f} s  {result.settings.view} lens; "
            f"copy rule p1>{config.copy_threshold} & margin>{config.copy_margin}"
            f"{' (+H<1 bit)' if config.copy_entropy_fallback else ''}; "
            f"L_copy={diag['L_copy']} L_semantic={diag['L_semantic']}; "
            f"last-layer KL {diag['last_layer_consistency']['kl_model_to_lens_bits']:.2e} bits")


def _sweep_one(config: ExperimentConfig, lm: Any, stages: Stages, directory: str, name: str,
               pictures: Any = None) -> dict:
    """One prompt: the sweep, its gates and warnings, the test prompts, the files."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnfingerprintedLensWarning)
        result = _sweep_one_prompt(config, lm, stages)
    for warning in caught:
        if issubclass(warning.category, UnfingerprintedLensWarning):
            print(f"⚠️  {warning.message}", file=sys.stderr)
    result.heatmap_window = config.heatmap_window
    stages.run("lens", _gate, config, result.analysis.consistency)
    mismatch = lens_mismatch_line(result.analysis.consistency)
    if mismatch:
        print(mismatch, file=sys.stderr)
    for warning in result.analysis.result.gold["warnings"]:
        print(f"⚠️  {warning}", file=sys.stderr)
    return _finish_one(config, lm, stages, directory, name, result, pictures)


def _sweep_one_prompt(config: ExperimentConfig, lm: Any, stages: Stages) -> Any:
    from layers_core.api.prompt import sweep

    answer = (config.answer, *config.aliases) if config.aliases else config.answer
    return stages.run("lens", sweep, lm, config.prompt, answer, lens=config.lens,
                      control=_control(config), settings=_sweep_settings(config))


def _finish_one(config: ExperimentConfig, lm: Any, stages: Stages, directory: str, name: str, result: Any,
                pictures: Any) -> dict:
    result.timing.update(startup_s=stages.timing.get("startup_s", 0.0), load_s=stages.timing["load_s"])
    result.clock_start = stages.clock_start
    if pictures is not None:
        result.draw_pictures(directory, name, pictures)
    # the picture processes now hold a core: torch's spinning threads must not wait for them
    spare = None if pictures is None or lm.device != "cpu" else max(1, _torch_threads() - 1)
    with threads.torch_threads(spare):
        stages.run("forward", lambda: result.test_prompts)
    say(config, f"  forward  {result.timing['forward_s']:6.2f} s  "
                f"{result.analysis.result.tokens.shape[1]} tokens, then "
                f"{len(result.test_prompts)} test prompts in batches of similar length")
    say(config, _lens_line(config, result))
    stages.run("write", result.save, directory, name=name, plots=config.plots,
               keep_residuals=config.keep_residuals, worker=pictures)
    if config.plots:
        say(config, f"  plots    {result.timing['plots_s']:6.2f} s  lens heatmap, layer curves, HTML report "
                    "(drawn while the test prompts ran; the wait they added)")
    say(config, f"  write    {result.timing['write_s']:6.2f} s  output-{name}.json, CSVs")
    return result.document


LOADED_FACTS = ("model", "dtype", "model_fingerprint")  # checkpoint settings known once the model is loaded


def _checkpoint_settings(config: ExperimentConfig, lm: Any) -> dict:
    """What a prompt set's checkpoints depend on (a resumed run must match it); without ``lm``,
    the fields known before loading."""
    import hashlib

    with open(config.prompts_file, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    from layers_core.lens.fingerprint import run_fingerprint

    loaded = {} if lm is None else {"model": lm.source.path or lm.source.model_id, "dtype": str(lm.dtype),
                                    "model_fingerprint": run_fingerprint(lm)}
    return {**loaded, "norm": config.norm_strategy, "lens": config.lens, "lens_path": config.lens_path,
            "copy_threshold": config.copy_threshold,
            "copy_margin": config.copy_margin, "copy_entropy_fallback": config.copy_entropy_fallback,
            "records": config.records, "shard": config.shard, "prompts_sha256": digest,
            "answer_join": config.answer_join}


def _foreign_lens_problem(config: ExperimentConfig, model_id: str | None) -> str | None:
    """A fitted lens whose recorded ``config.json`` hash differs from the model's, found before
    the model loads (the W_U hash is checked once it has)."""
    from layers_core.lens import fingerprint
    from layers_core.lens.tuned import read_lens_config
    from layers_core.lens.views import LOGIT, view

    if config.lens == LOGIT:
        return None
    try:
        source = resolve_model_source(model_id)
    except ModelLoadError:  # the load stage reports it
        return None
    lens_dir = config.lens_path or _default_lens_dir(config.lens, source.clean_name)
    model_dir = source.path if source.kind == "local_dir" else None
    lens_config = os.path.join(lens_dir or "", view(config.lens).files[0]) if view(config.lens).files else ""
    if not (model_dir and os.path.isfile(lens_config)):
        return None
    try:
        recorded = read_lens_config(lens_config)
    except ValueError as error:
        return f"--lens-path {lens_dir}: {error}"
    differing = fingerprint.mismatch(recorded, {"config_hash": fingerprint.config_hash(model_dir)},
                                     ("config_hash",))
    return fingerprint.foreign_lens_message(lens_dir, differing) if differing else None


def _default_lens_dir(lens: str, name: str) -> str | None:
    from layers_core.lens.views import resolve_entry, view

    entry = view(lens).default_dir
    return None if entry is None else resolve_entry(entry)(name)


def _resume_problem(config: ExperimentConfig, name: str) -> str | None:
    """``--resume`` against checkpoints made with other settings, found before the model loads."""
    from layers_core.results.progress import ProgressMismatch, ProgressStore

    try:
        ProgressStore(config.out_dir, name, _checkpoint_settings(config, None)).check_settings(ignore=LOADED_FACTS)
    except ProgressMismatch as mismatch:
        return str(mismatch)
    return None


def _sweep_set(config: ExperimentConfig, lm: Any, stages: Stages, directory: str, name: str) -> dict:
    from tqdm import tqdm

    from layers_core.api.prompt_set import SetOutput, SetPlan, stream_prompt_set
    from layers_core.results.progress import ProgressStore
    from layers_core.results.prompt_sets import load_prompt_set, parse_shard, shard_of

    items = load_prompt_set(config.prompts_file)
    indices, chosen = shard_of(items, None if config.shard is None else parse_shard(config.shard))
    store = None
    if config.out_dir is not None:
        store = ProgressStore(config.out_dir, name, _checkpoint_settings(config, lm))
    done = {} if store is None else stages.run("lens", store.start, config.resume)
    resumed = sum(index in done for index in indices)
    if resumed:
        say(config, f"  resume   {resumed} of {len(chosen)} prompts already done in {config.out_dir}")
    with tqdm(total=len(chosen), initial=resumed, unit="prompt", disable=config.quiet, file=sys.stdout,
              dynamic_ncols=True) as bar:
        warned: list[str] = []

        def on_batch(outcomes: list[dict], sweeps: list[Any]) -> None:
            for result in sweeps:
                _gate(config, result.analysis.consistency)
                mismatch = lens_mismatch_line(result.analysis.consistency)
                if mismatch and not warned:  # once per set: every prompt shares the lens
                    warned.append(mismatch)
                    bar.write(mismatch, file=sys.stderr)
            if store is not None:
                store.record(outcomes)
            bar.update(len(outcomes))

        plan = SetPlan(indices, done, on_batch, os.path.abspath(config.prompts_file), config.shard)
        output = SetOutput(directory, name, config.plots, total=len(items), clock_start=stages.clock_start,
                           timing={"startup_s": stages.timing.get("startup_s", 0.0),
                                   "load_s": stages.timing["load_s"]})
        result = stages.run("lens", stream_prompt_set, lm, chosen, config.lens, _sweep_settings(config), plan,
                            output)
    say(config, f"  forward  {result.timing['forward_s']:6.2f} s, lens {result.timing['lens_s']:6.2f} s, "
                f"{len(chosen)} prompts")
    return result.document


def run_model(model_id: str | None, config: ExperimentConfig, directory: str | None, name: str,
              stages: Stages | None = None, pictures: Any = None) -> dict:
    """Loads one model and runs the sweep (or set, or self-test); writes into ``directory``.

    Returns the JSON document (for ``--self-test``: ``{"last_layer_consistency": …}``). Failures
    are raised as ``StageError`` carrying the stage (load, forward, lens, write).
    """
    stages = stages or Stages()
    from layers_core.device_policy import resolve_device

    device_warnings: list[str] = []
    resolve_device(config.device, device_warnings)
    for warning in device_warnings:
        print(warning, file=sys.stderr)
    source = named_source(model_id)
    say(config, f"▶ {source.clean_name} ({source.kind})")
    lm = stages.run("load", _load, config, model_id)
    collector.resume_after_load()
    for warning in lm.load_report.warnings():
        print(warning, file=sys.stderr)
    cfg = lm.bridge.cfg
    say(config, f"  load     {stages.timing['load_s']:6.2f} s  {cfg.n_layers} layers, d_model {cfg.d_model}, "
                f"vocab {cfg.d_vocab}, {lm.device}, {lm.dtype}")
    if config.self_test:
        from layers_core.pipeline.sweep import self_test

        return {"last_layer_consistency": stages.run("forward", self_test, lm.bridge, config.prompt,
                                                     config.answer, lm.unembed)}
    if config.prompts_file is not None:
        return _sweep_set(config, lm, stages, directory, name)
    return _sweep_one(config, lm, stages, directory, name, pictures)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _error_line(name: str, failure: StageError) -> str:
    from layers_core.errors import first_line

    return f"❌ {name}: {failure.stage} failed: {type(failure.error).__name__}: {first_line(failure.error)}"


def self_test_exit(consistency: dict) -> int:
    """Prints the self-test verdict; its exit code."""
    from layers_core.pipeline.sweep import self_test_verdict

    passed, line = self_test_verdict(consistency)
    print(line)
    return EXIT_OK if passed else EXIT_FAILED


def run_single(model_id: str | None, config: ExperimentConfig, base_dir: str, stages: Stages,
               pictures: Any = None) -> int:
    """One model: staging → run → publish, or the error document; returns the exit code."""
    source = named_source(model_id)
    name = config.output_name or source.clean_name
    if config.self_test:
        try:
            return self_test_exit(run_model(model_id, config, None, name, stages)["last_layer_consistency"])
        except StageError as failure:
            print(_error_line(name, failure), file=sys.stderr)
            return EXIT_FAILED
    problem = None if config.allow_foreign_lens else _foreign_lens_problem(config, model_id)
    if problem is None and config.resume and config.prompts_file is not None:
        problem = _resume_problem(config, name)
    if problem:
        print(f"run.py: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    managed = config.out_dir is None
    home = base_dir if managed else config.out_dir
    os.makedirs(home, exist_ok=True)
    if managed:
        return _staged_run(model_id, source, config, base_dir, name, stages, pictures)
    try:
        with model_lock(home, name):
            return _staged_run(model_id, source, config, base_dir, name, stages, pictures)
    except RunLockedError as locked:
        print(f"❌ {name}: {locked}", file=sys.stderr)
        return EXIT_FAILED


def _staged_run(model_id: str | None, source: ModelSource, config: ExperimentConfig, base_dir: str, name: str,
                stages: Stages, pictures: Any) -> int:
    """Staging → run → publish (then a finished set's checkpoints go), or the error document."""
    from layers_core.errors import first_line

    managed = config.out_dir is None
    home = base_dir if managed else config.out_dir
    remove_stale_staging(home)
    try:
        staging = create_staging_dir(home)
    except OSError as error:  # a full disk, a quota
        print(f"❌ {name}: cannot create a staging directory in {home}: {first_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    try:
        run_model(model_id, config, staging, name, stages, pictures)
    except StageError as failure:
        from layers_core.results.outputs import write_error_document

        # managed: the staging dir becomes run-<now>-failed; --out_dir: the error document goes
        # beside the model's earlier files, which only a successful run replaces
        target = staging if managed else home
        try:
            write_error_document(output_paths(target, name)["error_json"], failure.error, failure.stage,
                                 source.model_id, {"model_source": source.kind, "model_path": source.path,
                                                   "argv": sys.argv})
        except OSError as unwritable:  # a full disk: the line still says what failed
            shutil.rmtree(staging, ignore_errors=True)
            print(f"{_error_line(name, failure)} (no error document: {first_line(unwritable)})", file=sys.stderr)
            return EXIT_FAILED
        if managed:
            where = publish_staging_dir(staging, home, success=False)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            where = home
        print(f"{_error_line(name, failure)} (error document in {where})", file=sys.stderr)
        return EXIT_FAILED
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        with signals_deferred():
            where = _publish(staging, home, name, managed)
    except PublishError as error:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"❌ {name}: {error.strerror}", file=sys.stderr)
        return EXIT_FAILED
    if config.prompts_file is not None and not managed:
        from layers_core.results.progress import ProgressStore

        ProgressStore(home, name, {}).finish()  # published: a later --resume has nothing to skip
    if managed:
        prune_runs(base_dir, config.keep_runs, current=where)
    later = rotation_target(where) if managed else None
    print(f"✅ {name}: results in {where}" + (f" (moves to {later} when a newer run publishes)" if later else ""))
    return EXIT_OK


def _publish(staging: str, home: str, name: str, managed: bool) -> str:
    """A successful model's files: the new run-latest/, or replacing its files in --out_dir as a
    whole (a stale error document of it included)."""
    if managed:
        return publish_staging_dir(staging, home, success=True)
    publish_model_files(staging, home, name)
    return home


def run_in_process(model_id: str | None, config: ExperimentConfig, base_dir: str) -> int:
    """One model in this process: start-up, threads, the picture worker, then ``run_single``.

    A shard (``--shard K/N``, or ``--shard auto`` resolved here from the launcher's environment)
    writes into ``--out_dir/shard-K-of-N/``, so shards of one directory never overwrite each
    other; under torchrun every rank then meets at a barrier and rank 0 merges the shards into
    ``--out_dir``.
    """
    from layers_core.results.prompt_sets import AUTO_SHARD, SHARD_DIR, parse_shard, resolve_shard

    if config.shard is not None and config.shard != AUTO_SHARD and config.out_dir is not None:
        k, n = parse_shard(config.shard)  # shards of one --out_dir never overwrite each other
        config = replace(config, out_dir=os.path.join(config.out_dir, SHARD_DIR.format(k=k, n=n)))
    if config.shard != AUTO_SHARD:
        return _run_in_process(model_id, config, base_dir)
    spec = resolve_shard(config.shard, os.environ)
    shard_config = replace(config, shard=spec.text,
                           out_dir=os.path.join(config.out_dir, SHARD_DIR.format(k=spec.k, n=spec.n)))
    if spec.local_rank is not None and config.device in ("auto", "cuda"):
        _use_local_gpu(spec.local_rank)
    code = _run_in_process(model_id, shard_config, base_dir)
    if spec.launcher != "torchrun":
        return code  # Slurm: one merge.py OUT call after the array (README)
    from layers_core.app.distributed import merge_after_barrier

    return merge_after_barrier(code, spec, config.out_dir, plots=config.plots, quiet=config.quiet)


def _use_local_gpu(local_rank: int) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)


def _run_in_process(model_id: str | None, config: ExperimentConfig, base_dir: str) -> int:
    from layers_core.results.pictures import PictureWorker

    single_prompt = config.prompts_file is None and not config.self_test
    pictures = PictureWorker() if config.plots and single_prompt else None
    try:
        stages = Stages()
        before = threads.snapshot()
        stages.run("startup", prepare_runtime, config.device)
        with threads.torch_threads(_thread_count(config, before)):
            return run_single(model_id, config, base_dir, stages, pictures)
    finally:
        if pictures is not None:
            pictures.close()
