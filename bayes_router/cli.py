"""The ``bayes-router`` command: it parses arguments into configurations (taking their defaults
and choices from the dataclasses) and chooses the plotting backend; the library does neither."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

COMMANDS = {}


def command(name: str, help: str, arguments=None):
    """Register ``fn(args) -> exit code`` as subcommand ``name``; ``arguments(parser)`` adds its
    options."""
    def register(fn):
        COMMANDS[name] = (fn, help, arguments)
        return fn
    return register


def _beta0(text: str):
    if text == "learn":
        return "learn"
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"beta0 must be a positive number, a comma-separated list, or 'learn'; got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _comma_list(kind: type):
    """An argparse type: comma-separated values of ``kind`` (``"1,2,4"`` -> ``[1, 2, 4]``)."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def _comma_names(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``: names stripped, empty ones dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _comma_tuple(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``; empty names are kept for the config to refuse by name."""
    return tuple(text.split(","))


# ------------------------------------------------------------------------------------------------
# options generated from the configuration dataclasses


#: Fields whose option type their annotation does not give.
FIELD_PARSERS = {"beta0": _beta0, "experts": _comma_tuple,
                 # VarianceLabConfig
                 "estimators": _comma_names, "particle_estimators": _comma_names,
                 "sweep_estimators": _comma_names, "particles": _comma_list(int),
                 "beta0_values": _comma_list(float), "along_training": _comma_list(int),
                 # Beta0FitConfig
                 "grid": _comma_list(float)}
_ANNOTATION_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _option_type(cls, field):
    if field.name in FIELD_PARSERS:
        return FIELD_PARSERS[field.name]
    annotation = field.type if isinstance(field.type, str) else field.type.__name__
    kind = _ANNOTATION_TYPES.get(annotation.removesuffix(" | None"))
    if kind is None:  # a new field needs an entry in FIELD_PARSERS
        raise TypeError(f"{cls.__name__}.{field.name}: no command-line type for {field.type!r}")
    return kind


def add_config_options(group, cls, defaults: dict | None = None, skip=()) -> None:
    """One option per field of the dataclass ``cls`` (built with
    :func:`bayes_router.core.options.option`): ``--<field-name>`` or the field's ``flag``, its
    type, choices and help from the field, its default from the field or ``defaults``. The
    option's destination is the field's name, so :func:`config_from_args` rebuilds ``cls``."""
    defaults = defaults or {}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if field.name in skip or not meta.get("command_line", True):
            continue
        default = defaults.get(field.name, field.default)
        names = (meta.get("flag", "--" + field.name.replace("_", "-")), *meta.get("aliases", ()))
        kind = _option_type(cls, field)
        if kind is bool:
            action = ("store_false" if meta.get("negate") else "store_true" if meta.get("switch")
                      else argparse.BooleanOptionalAction)
            group.add_argument(*names, dest=field.name, action=action, default=default,
                               help=meta["help"])
            continue
        help = meta["help"]
        if "choices" in meta and "metavar" in meta:  # the metavar hides the choices: list them
            help += f"; one of {', '.join(meta['choices'])}"
        if isinstance(default, tuple):  # shown and parsed as the comma list one types
            default = ",".join(str(v) for v in default)
        metavar = meta.get("metavar")
        if metavar is None and "choices" not in meta:  # named after the flag, not the field
            metavar = names[0].lstrip("-").replace("-", "_").upper()
        group.add_argument(*names, dest=field.name, type=kind, default=default, help=help,
                           choices=meta.get("choices"), metavar=metavar)
        if "none_flag" in meta:
            group.add_argument(meta["none_flag"], dest=field.name, action="store_const",
                               const=None, help=meta["none_help"])


def config_from_args(cls, args, **fixed):
    """``cls`` from the options :func:`add_config_options` added, with ``fixed`` fields."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name) and f.metadata.get("command_line", True)}
    return cls(**{**values, **fixed})


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from bayes_router.models.config import PHASE1_SIZE, TinyLMConfig

    g = p.add_argument_group("model (defaults: the Phase-1 size, TinyLMConfig.phase1)")
    add_config_options(g, TinyLMConfig, defaults=PHASE1_SIZE)


def _add_train_args(p: argparse.ArgumentParser, skip=()) -> None:
    from bayes_router.inference.train_config import TrainConfig

    g = p.add_argument_group("training (defaults: TrainConfig)")
    add_config_options(g, TrainConfig, skip=skip)


def _load_configs(args, **fixed):
    """The model and training configurations of the options, and the data they load: the data
    are loaded from a first pass (synthetic tasks take the model's window and sequence length)
    and the model is then built for their vocabulary."""
    from bayes_router.experiments.run_loading import load_data
    from bayes_router.inference.train_config import TrainConfig
    from bayes_router.models.config import TinyLMConfig

    probe = config_from_args(TrainConfig, args, **fixed)
    data = load_data(probe, config_from_args(TinyLMConfig, args))
    return (config_from_args(TinyLMConfig, args, vocab_size=data.vocab_size), probe, data)


def _add_out(p, required: bool = True, help: str = "output folder") -> None:
    p.add_argument("--out", required=required, default=None, help=help)
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it holds another command's output")


def _out_dir(args, command: str, default: Path | None = None) -> Path:
    """``--out`` (or ``default``) checked and created: not empty, a writable folder, not
    another command's output unless ``--force``."""
    from bayes_router.experiments.run_loading import check_run_dir
    from bayes_router.experiments.rundir import prepare_output_dir

    if getattr(args, "run_dir", None) is not None:
        check_run_dir(Path(args.run_dir))  # before a default folder is made inside it
    path = default if args.out is None else args.out
    return prepare_output_dir(path, command, force=args.force)


def _add_device(p) -> None:
    from bayes_router.inference.distributed import DEVICES

    p.add_argument("--device", default="auto",
                   help=f"{' | '.join(DEVICES)}; auto: CUDA when available (each torchrun "
                        "process its LOCAL_RANK's GPU), else the CPU")


def _train_arguments(p):
    _add_model_args(p)
    _add_train_args(p)
    _add_device(p)
    _add_out(p, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its checkpoint")


@command("train", "train a Bayesian, prior-free or static routed LM into a run directory",
         _train_arguments)
def cmd_train(args) -> int:
    from bayes_router.experiments.run_evaluation import EVAL_BATCHES
    from bayes_router.experiments.training_runs import train_run
    from bayes_router.inference.checkpoint import (
        CHECKPOINT_NAME,
        check_same_config,
        load_checkpoint,
    )

    if args.resume and not (Path(args.out) / CHECKPOINT_NAME).exists():
        raise ValueError(f"--resume: {args.out} holds no {CHECKPOINT_NAME}")
    model_cfg, train_cfg, data = _load_configs(args)
    _out_dir(args, "train")
    if args.resume:
        check_same_config(load_checkpoint(Path(args.out) / CHECKPOINT_NAME), model_cfg,
                          train_cfg)
    metrics = train_run(model_cfg, train_cfg, Path(args.out), resume=args.resume, data=data,
                        eval_batches=None if train_cfg.eval_batches is None else EVAL_BATCHES,
                        device=args.device)
    if metrics is None:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    print(json.dumps({m: {k: metrics[m][k] for k in ("val_nll", "val_bpc",
                                                     "projected_flop_cost", "routing_entropy")}
                      for m in ("soft", "hard")}, indent=2))
    return 0


def _evaluate_arguments(p):
    from bayes_router.core.precision import DTYPES
    from bayes_router.models.router import ROUTING_MODES

    p.add_argument("run_dir", help="a finished run directory (of `bayes-router train`)")

    p.add_argument("--routing", default=ROUTING_MODES[0], choices=ROUTING_MODES,
                   help="soft: every expert weighted; hard: each token's argmax expert only; "
                        "gated: hard where the routing uncertainty is below --gate-threshold")
    p.add_argument("--gate-threshold", type=float, default=None,
                   help="normalised-entropy threshold in [0, 1] of --routing gated")
    p.add_argument("--split", default="val", choices=["val", "test"],
                   help="held-out split to evaluate")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the LM's matmuls under autocast (default full precision, whatever "
                        "the run trained in)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per evaluation window, and the decoding step timed at the "
                        "context they leave (default: the run's training length; longer than "
                        "max_seq_len only for a run trained with --positions rotary)")
    _add_device(p)


@command("evaluate", "evaluate a trained run under soft, hard or gated routing",
         _evaluate_arguments)
def cmd_evaluate(args) -> int:
    from bayes_router.experiments.run_evaluation import evaluate_run

    if args.routing == "gated" and args.gate_threshold is None:
        raise ValueError("--routing gated needs --gate-threshold (normalised entropy in [0, 1])")
    metrics = evaluate_run(Path(args.run_dir), mode=args.routing,
                           gate_threshold=args.gate_threshold, split=args.split,
                           device=args.device, dtype=args.dtype, seq_len=args.seq_len)
    print(json.dumps({k: v for k, v in metrics.items() if k != "expert_share"}, indent=2))
    return 0


def _generate_arguments(p):
    from bayes_router.inference.decoding import DecodeConfig

    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, metavar="TEXT",
                        help="text to continue (a run trained on a text corpus), repeated "
                             "--batch times; None: the start of validation windows")
    prompt.add_argument("--prompt-file", default=None, metavar="PATH",
                        help="read the prompt from a UTF-8 file, as it is (a final newline "
                             "included)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="without a prompt: the first N tokens of each validation window "
                        "(default 16)")
    add_config_options(p.add_argument_group("decoding (defaults: DecodeConfig)"), DecodeConfig)
    p.add_argument("--batch", type=int, default=1, help="sequences generated together")
    _add_device(p)
    _add_out(p, required=False, help="output folder (default RUN_DIR/generate)")


@command("generate", "generate text from a trained run with per-expert caches, under soft, "
         "hard or gated routing", _generate_arguments)
def cmd_generate(args) -> int:
    from bayes_router.experiments.generate import generate_run
    from bayes_router.inference.decoding import DecodeConfig

    config = config_from_args(DecodeConfig, args)  # its checks name the field and the range
    prompt = args.prompt
    if args.prompt_len is not None and (prompt is not None or args.prompt_file is not None):
        raise ValueError("--prompt-len takes the prompts from validation windows; a given "
                         "prompt is used whole (leave out --prompt-len)")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"--prompt-file {path} is not a file")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"--prompt-file {path} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start})") from None
    out = _out_dir(args, "generate", Path(args.run_dir) / "generate")
    result = generate_run(Path(args.run_dir), out, config, prompt=prompt, batch=args.batch,
                          prompt_len=16 if args.prompt_len is None else args.prompt_len,
                          device=args.device)
    for b, sequence in enumerate(result["sequences"]):
        if result["batch"] > 1:
            print(f"--- sequence {b} ---")
        if sequence["generated_text"] is not None:
            print(sequence["generated_text"])
        else:
            print(" ".join(str(i) for i in sequence["generated_ids"]))
    if not result["step_seconds"]:  # one new token: it comes from the prefill's logits
        print(f"\nno decoding step timed (max_new_tokens=1); prefill "
              f"{result['prefill_seconds']:.4f} s")
    else:
        print(f"\n{result['tokens_per_second']:.1f} tokens/s ({result['batch']} sequence(s), "
              f"mean step {result['mean_step_ms']:.3f} ms, prefill "
              f"{result['prefill_seconds']:.4f} s, soft fraction {result['soft_fraction']:.3f})")
    print(f"wrote {out}/generate.json, {out}/routing.png and {out}/report.md")
    return 0


def _gate_sweep_arguments(p):
    from bayes_router.experiments.gate_sweep import DEFAULT_SOFT_FRACTIONS

    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished bayesian or prior-free run")
    _add_out(p, required=False, help="output folder (default RUN_DIR/gate-sweep)")
    p.add_argument("--thresholds", type=_comma_list(float), default=None,
                   help="gate thresholds on the normalised uncertainty, in [0, 1], for every "
                        "measure (default: each measure's quantiles at --soft-fractions)")
    p.add_argument("--soft-fractions", type=_comma_list(float),
                   default=list(DEFAULT_SOFT_FRACTIONS),
                   help="shares of the decisions to leave soft, in [0, 1]")
    p.add_argument("--eval-batches", type=int, default=8,
                   help="validation batches of 16 windows behind each NLL")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each decoding step")
    p.add_argument("--seed", type=int, default=0, help="seed of the random gate's draws")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per validation window, and the decoding context they leave "
                        "(default: the run's training length; longer than max_seq_len only "
                        "for a run trained with --positions rotary)")


@command("gate-sweep", "validation NLL against the measured decoding step as the gate "
         "threshold moves: the router's uncertainty gate beside the random gate at the same "
         "soft fraction", _gate_sweep_arguments)
def cmd_gate_sweep(args) -> int:
    from bayes_router.experiments.gate_sweep import gate_sweep, gate_sweep_report

    out = _out_dir(args, "gate-sweep", Path(args.run_dir) / "gate-sweep")
    result = gate_sweep(Path(args.run_dir), out,
                        thresholds=None if args.thresholds is None else tuple(args.thresholds),
                        soft_fractions=tuple(args.soft_fractions),
                        eval_batches=args.eval_batches, repeats=args.repeats, seed=args.seed,
                        seq_len=args.seq_len)
    print(gate_sweep_report(result))
    print(f"wrote {out}/gate_sweep.json, {out}/gate_sweep.png and {out}/report.md")
    return 0


def _phase1_arguments(p):
    from bayes_router.experiments.phase1 import PHASE1_ROUTERS

    _add_model_args(p)
    _add_train_args(p, skip=("router",))
    g = p.add_argument_group("comparison")
    _add_out(g, help="comparison folder (one run folder per router and seed inside)")
    g.add_argument("--routers", type=_comma_names_routers, default=list(PHASE1_ROUTERS),
                   help="semicolon-separated router specs (the --router values of train)")
    g.add_argument("--seeds", type=int, default=3, help="seeds --seed .. --seed + N - 1")
    g.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    g.add_argument("--no-report", action="store_true",
                   help="skip the learned routers' analysis reports")
    _add_device(g)


def _comma_names_routers(text: str) -> list[str]:
    """Router specs separated by ';' (their shares use commas)."""
    return [v.strip() for v in text.split(";") if v.strip()]


@command("phase1", "the Phase-1 comparison: Bayesian and prior-free routing beside static "
         "one-expert baselines, with a power check", _phase1_arguments)
def cmd_phase1(args) -> int:
    from bayes_router.experiments.phase1 import phase1_table, run_phase1
    from bayes_router.experiments.run_evaluation import EVAL_BATCHES

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    # the router is replaced by each of --routers
    model_cfg, train_cfg, _ = _load_configs(args, router="bayesian")
    _out_dir(args, "phase1")
    result = run_phase1(Path(args.out), seeds=args.seeds, model_cfg=model_cfg,
                        train_cfg=train_cfg, report=not args.no_report,
                        routers=tuple(args.routers), jobs=args.jobs, first_seed=args.seed,
                        eval_batches=None if train_cfg.eval_batches is None else EVAL_BATCHES,
                        device=args.device)
    print(phase1_table(result))
    print(f"\npower check: {result['power']['reason']}")
    for claim in result["claims"]:
        print(f"- {claim['text']}: {claim['verdict']}")
    print(f"\nwrote {args.out}/phase1.json, {args.out}/phase1.md and "
          f"{args.out}/quality_vs_compute.png")
    return 0


def _bench_arguments(p):
    from bayes_router.bench.decode import DECODE_MODEL

    _add_out(p)
    p.add_argument("--seq-lens", type=_comma_list(int), default=[128, 256, 512, 1024, 2048, 4096],
                   help="sequence lengths of the expert timings")
    p.add_argument("--hard-seq-len", type=int, default=None,
                   help="length of the hard-routed layer timing (default: the longest of "
                        "--seq-lens)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--no-svi-step", action="store_true",
                   help="skip the SVI step timing (two LM sizes, about a minute)")
    p.add_argument("--no-flex", action="store_true",
                   help="skip the compiled flex_attention baseline (it compiles for ~20-50 s)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (a fresh process per configuration)")
    g = p.add_argument_group("decoding (decode.json, decode.png, decode.md)")
    g.add_argument("--decode-contexts", type=_comma_list(int), default=[1024, 4096, 8192, 16384],
                   help="contexts (cached tokens) at which a decoding step is timed")
    g.add_argument("--decode-batches", type=_comma_list(int), default=[1, 8],
                   help="sequences decoded together")
    g.add_argument("--decode-steps", type=int, default=16,
                   help="decoding steps per timed run (the time of one step is their mean)")
    g.add_argument("--decode-d-model", type=int, default=DECODE_MODEL["d_model"],
                   help="residual width D of the decoded model (64: the Phase-1 width)")
    g.add_argument("--decode-window", type=int, default=DECODE_MODEL["window"],
                   help="local expert's look-back w of the decoded model (16: Phase-1's)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--no-decode", action="store_true", help="skip the decoding benchmark")
    mode.add_argument("--decode-only", action="store_true",
                      help="run only the decoding benchmark")


@command("bench", "speed benchmark of the experts, the hard-routed layer and decoding",
         _bench_arguments)
def cmd_bench(args) -> int:
    from bayes_router.bench import BenchConfig, format_table, run_benchmark
    from bayes_router.bench.decode import decode_table, run_decode_benchmark

    _out_dir(args, "bench")
    if not args.decode_only:
        config = BenchConfig(seq_lens=tuple(args.seq_lens), hard_seq_len=args.hard_seq_len,
                             repeats=args.repeats, svi_configs=() if args.no_svi_step else None,
                             flex=not args.no_flex, memory=not args.no_memory)
        results = run_benchmark(Path(args.out), config)
        print(format_table(results))
        print(f"\nwrote {args.out}/bench.json, {args.out}/bench.png and {args.out}/report.md")
    if not args.no_decode:
        decode = run_decode_benchmark(Path(args.out), contexts=tuple(args.decode_contexts),
                                      batches=tuple(args.decode_batches), repeats=args.repeats,
                                      steps=args.decode_steps,
                                      model={"d_model": args.decode_d_model,
                                             "window": args.decode_window})
        print(decode_table(decode))
        print(f"\nwrote {args.out}/decode.json, {args.out}/decode.png and {args.out}/decode.md")
    return 0


def _data_arguments(p):
    from bayes_router.inference.train_config import TrainConfig
    from bayes_router.models.config import PHASE1_SIZE

    d = _field_defaults(TrainConfig)
    p.add_argument("--corpus", default=d["dataset"],
                   help="'stdlib', a text file or folder, or synthetic:<task or preset>")
    p.add_argument("--max-chars", type=int, default=d["dataset_max_chars"],
                   help="characters of a text corpus described (train's default cap, so both "
                        "describe the same text; 0: the whole corpus)")
    p.add_argument("--seq-len", type=int, default=d["seq_len"],
                   help="sequence length a synthetic task is built at (as train builds it)")
    p.add_argument("--window", type=int, default=PHASE1_SIZE["window"],
                   help="local window a synthetic task is built for (train's --window)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of a synthetic task")
    _add_out(p, required=False, help="also write data.json, data.png and report.md here")


@command("data", "print statistics of a corpus", _data_arguments)
def cmd_data(args) -> int:
    if args.max_chars is not None and args.max_chars < 0:
        raise ValueError(f"--max-chars must be >= 0 (0: the whole corpus), got {args.max_chars}")
    options = dict(max_chars=args.max_chars or None, seed=args.seed)
    if args.corpus.startswith("synthetic:"):
        options.update(seq_len=args.seq_len, window=args.window)
    if args.out is not None:
        from bayes_router.experiments.corpus_report import corpus_report

        stats = corpus_report(args.corpus, _out_dir(args, "data"), **options)
    else:
        from bayes_router.data import corpus_statistics, load_corpus

        stats = corpus_statistics(load_corpus(args.corpus, **options))
    print(json.dumps(stats, indent=2))
    return 0


def _analysis_options(p):
    from bayes_router.experiments.run_evaluation import EVAL_BATCHES

    p.add_argument("--max-batches", type=int, default=EVAL_BATCHES,
                   help="validation batches of 16 windows to analyse (default: the windows "
                        "behind metrics.json)")
    p.add_argument("--num-samples", type=int, default=8,
                   help="routing samples of the Bayesian model average")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (of windows)")


def _calibrate_arguments(p):
    p.add_argument("run_dir", help="a finished run directory")
    _add_out(p, required=False, help="output folder (default RUN_DIR/analysis)")
    _analysis_options(p)


@command("calibrate", "calibration of a run's plug-in and Bayesian-model-average predictives",
         _calibrate_arguments)
def cmd_calibrate(args) -> int:
    from bayes_router.experiments.report import calibrate_run, calibration_table

    out = _out_dir(args, "calibrate", Path(args.run_dir) / "analysis")
    result = calibrate_run(Path(args.run_dir), out, max_batches=args.max_batches,
                           num_samples=args.num_samples, n_boot=args.n_boot)
    print("\n".join(calibration_table(result)))
    print(f"\nwrote {out}/calibration.json and {out}/calibration.md")
    return 0


def _report_arguments(p):
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="one or more finished run directories")
    _add_out(p, required=False,
             help="output folder of a single run's analysis (default RUN_DIR/analysis)")
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="with several runs: write their calibration comparison into DIR")
    _analysis_options(p)


@command("report", "analysis of a run: calibration, routing uncertainty, damage of hard routing",
         _report_arguments)
def cmd_report(args) -> int:
    from bayes_router.experiments.report import analyse_run, analyse_runs
    from bayes_router.experiments.run_loading import check_run_dir

    options = dict(max_batches=args.max_batches, num_samples=args.num_samples,
                   n_boot=args.n_boot)
    if args.out is not None and len(args.run_dirs) > 1:
        raise ValueError("--out takes a single RUN_DIR; several runs are each analysed into "
                         "RUN_DIR/analysis (use --compare DIR for a side-by-side comparison)")
    if args.out is not None:
        results = [analyse_run(Path(args.run_dirs[0]), _out_dir(args, "report"), **options)]
        outs = [Path(args.out)]
    else:
        for run_dir in args.run_dirs:
            check_run_dir(Path(run_dir))
            _out_dir(args, "report", Path(run_dir) / "analysis")
        results = analyse_runs(args.run_dirs, out_dir=args.compare, **options)
        outs = [Path(d) / "analysis" for d in args.run_dirs]
    for out, result in zip(outs, results, strict=True):
        c = result["calibration"]["predictives"]
        print(f"{result['run_dir']} ({result['router']}): " + ", ".join(
            f"{name} ECE {p['ece']['value']:.4f} NLL {p['nll']['value']:.4f}"
            for name, p in c.items())
              + f"; damage mean {result['damage']['mean']:.4f} nats -> {out}/report.md")
    if args.compare:
        print(f"wrote {args.compare}/comparison.md")
    return 0


def _sweep_beta0_arguments(p):
    _add_model_args(p)
    _add_train_args(p, skip=("beta0",))
    g = p.add_argument_group("sweep")
    g.add_argument("--values", type=_comma_list(float), default=[0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                   help="comma-separated beta0 values (each > 0)")
    g.add_argument("--seeds", type=int, default=3, help="seeds --seed .. --seed + N - 1")
    _add_out(g, help="sweep folder")
    g.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    g.add_argument("--mark", default=None,
                   help="JSON file with an empirical-Bayes beta0 to mark on the plots")
    _add_device(g)


@command("sweep-beta0", "train and evaluate Bayesian runs over a grid of beta0 values x seeds",
         _sweep_beta0_arguments)
def cmd_sweep_beta0(args) -> int:
    from bayes_router.experiments.run_evaluation import EVAL_BATCHES
    from bayes_router.experiments.sweep import sweep_beta0, sweep_report

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    # beta0 is replaced by each sweep value
    model_cfg, train_cfg, _ = _load_configs(args, beta0=1.0)
    _out_dir(args, "sweep-beta0")
    result = sweep_beta0(args.values, list(range(args.seed, args.seed + args.seeds)),
                         Path(args.out), model_cfg, train_cfg, jobs=args.jobs, mark=args.mark,
                         eval_batches=None if train_cfg.eval_batches is None else EVAL_BATCHES,
                         device=args.device)
    print(sweep_report(result))
    print(f"wrote {args.out}/sweep.json and {args.out}/report.md")
    return 0


def _variance_arguments(p):
    from bayes_router.experiments.variance_lab import VarianceLabConfig

    _add_out(p)
    p.add_argument("--checkpoint", default=None, metavar="RUN_DIR",
                   help="measure a trained Bayesian run (default: train a small model here)")
    add_config_options(p.add_argument_group("lab (defaults: VarianceLabConfig)"),
                       VarianceLabConfig)


@command("variance", "gradient-variance lab: variance, SNR and cost of every ELBO estimator",
         _variance_arguments)
def cmd_variance(args) -> int:
    from bayes_router.experiments.variance_lab import VarianceLabConfig, variance_lab
    from bayes_router.experiments.variance_report import variance_report

    if args.toy and args.checkpoint:
        raise ValueError("--toy and --checkpoint exclude each other")
    config = config_from_args(VarianceLabConfig, args)  # its checks name the field
    _out_dir(args, "variance")
    result = variance_lab(Path(args.out), config,
                          Path(args.checkpoint) if args.checkpoint else None)
    print(variance_report(result))
    print(f"wrote {args.out}/variance.json and {args.out}/report.md")
    return 0


def _fit_beta0_arguments(p):
    from bayes_router.experiments.beta0_fit import Beta0FitConfig

    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished Bayesian run directory")
    _add_out(p, required=False, help="output folder (default RUN_DIR/empirical-bayes)")
    add_config_options(p.add_argument_group("fit (defaults: Beta0FitConfig)"), Beta0FitConfig)


@command("fit-beta0", "empirical-Bayes beta0 of a run: type-II ML in SVI and Minka's M-step",
         _fit_beta0_arguments)
def cmd_fit_beta0(args) -> int:
    from bayes_router.experiments.beta0_fit import Beta0FitConfig, beta0_report, fit_beta0_run

    config = config_from_args(Beta0FitConfig, args)  # its checks name the field
    out = _out_dir(args, "fit-beta0", Path(args.run_dir) / "empirical-bayes")
    result = fit_beta0_run(Path(args.run_dir), config, out)
    print(beta0_report(result))
    print(f"wrote {out}/beta0.json and {out}/report.md")
    return 0


def _evidence_arguments(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    _add_out(p, required=False, help="output folder (default RUN_DIR/evidence)")
    p.add_argument("--tokens", type=int, default=256, help="validation tokens sampled")
    p.add_argument("--windows", type=int, default=16, help="validation windows they come from")
    p.add_argument("--seed", type=int, default=0, help="seed of the token sample")


@command("evidence", "evidence vs commitment: each token's likelihood gain of routing to an "
         "expert beside the KL the guide must pay to commit there", _evidence_arguments)
def cmd_evidence(args) -> int:
    from bayes_router.experiments.evidence import evidence_report, evidence_run

    out = _out_dir(args, "evidence", Path(args.run_dir) / "evidence")
    result = evidence_run(Path(args.run_dir), out, tokens=args.tokens, windows=args.windows,
                          seed=args.seed)
    print(evidence_report(result))
    print(f"wrote {out}/evidence.json, {out}/evidence.png and {out}/report.md")
    return 0


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _add_global_options(p: argparse.ArgumentParser, default) -> None:
    """``-v`` and ``--threads``, accepted before or after the subcommand (after it, the
    subparser's ``SUPPRESS`` default leaves the value given before it alone)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log at INFO level (and show the traceback of an error)")
    p.add_argument(
        "--threads", type=int, default=None if default is not argparse.SUPPRESS else default,
        help="torch CPU threads (default: 1 for the small-model commands, where intra-op "
             "threading does not pay and OpenMP spin-waits are slow on shared machines; all "
             "cores for `bench`)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not where its help already states it ("(default ..."),
    nor for switches and options without one."""

    def _get_help_string(self, action):
        help = action.help or ""
        if ("(default" in help or action.default is None or isinstance(action.default, bool)
                or isinstance(action, argparse._StoreConstAction)):
            return help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-router",
        description="Bayesian per-token attention routing: train, evaluate, analyse.")
    _add_global_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        if arguments is not None:
            arguments(p)
        _add_global_options(p.add_argument_group("global options"), default=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    fn, _, _ = COMMANDS[args.command]
    import matplotlib

    matplotlib.use("Agg")  # files only: the library never picks a backend itself
    if args.threads is not None:
        if args.threads < 1:
            print("bayes-router: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch_threads(args.threads)
    elif args.command != "bench":
        torch_threads(1)
    from bayes_router.experiments.rundir import OutputBusy
    from bayes_router.inference.train import TrainingDiverged

    def fail(error, status: int) -> int:
        if args.verbose:
            logging.getLogger("bayes_router.cli").exception("%s failed", args.command)
        print(f"bayes-router {args.command}: error: {error}", file=sys.stderr)
        return status

    try:
        return fn(args)
    except (TrainingDiverged, OutputBusy) as error:  # a run that failed: exit status 1
        return fail(error, 1)
    except ValueError as error:  # usage errors; a TypeError is a bug and keeps its traceback
        return fail(error, 2)
    except BrokenPipeError:  # `bayes-router data | head`: the reader left; say so as a shell does
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes stdout at exit)
        return 141
    except OSError as error:  # the file system refused: say which file and why
        where = f"{error.filename}: " if error.filename else ""
        hint = "" if args.verbose else " (-v shows the traceback)"
        return fail(f"{where}{error.strerror or error}{hint}", 1)
    except KeyboardInterrupt:
        print(f"bayes-router {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
