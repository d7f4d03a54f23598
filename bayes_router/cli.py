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


# ------------------------------------------------------------------------------------------------


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from bayes_router.models.config import COST_PRESETS, PHASE1_SIZE, POSITIONS, TinyLMConfig

    d = {**_field_defaults(TinyLMConfig), **PHASE1_SIZE}
    g = p.add_argument_group("model (defaults: the Phase-1 size, TinyLMConfig.phase1)")
    g.add_argument("--d-model", type=int, default=d["d_model"], help="residual width D")
    g.add_argument("--n-heads", type=int, default=d["n_heads"], help="attention heads H")
    g.add_argument("--n-layers", type=int, default=d["n_layers"], help="transformer blocks L")
    g.add_argument("--max-seq-len", type=int, default=d["max_seq_len"],
                   help="longest training sequence (fixes the position feature); with learned "
                        "positions also the longest context the model can decode")
    g.add_argument("--positions", default=d["positions"], choices=POSITIONS,
                   help="learned: absolute position embeddings up to --max-seq-len; rotary: "
                        "rotary embeddings of q and k (decodes past --max-seq-len)")
    g.add_argument("--window", type=int, default=d["window"], help="local expert's look-back w")
    g.add_argument("--chunk-size", type=int, default=d["chunk_size"],
                   help="linear expert's chunk length")
    g.add_argument("--experts", default=",".join(d["experts"]),
                   help="comma-separated expert names (see the expert registry)")
    g.add_argument("--separate-qkv", action="store_true",
                   help="one q/k/v/out projection per expert (default: shared)")
    g.add_argument("--untie-head", action="store_true",
                   help="an output head of its own (default: tied to the token embedding)")
    g.add_argument("--cost-preset", default=d["cost_preset"], choices=COST_PRESETS,
                   help="seed: the paper's fixed [1.0, 0.15, 0.30]; flops: from the FLOP model")


def _add_train_args(p: argparse.ArgumentParser, router: bool = True) -> None:
    from bayes_router.core.precision import DTYPES
    from bayes_router.inference.estimators import estimator_names
    from bayes_router.inference.train_config import ROUTERS, TrainConfig
    from bayes_router.models.bayesian import PRIOR_MEANS, PRIORS

    d = _field_defaults(TrainConfig)
    g = p.add_argument_group("training (defaults: TrainConfig)")
    if router:
        g.add_argument("--router", default=d["router"],
                       help=f"{' or '.join(ROUTERS)}, or a static baseline: fixed:<expert> "
                            "(one expert everywhere), fixed:<s1,..,sK> (constant hard shares in "
                            "the order of --experts, positions assigned at random with the "
                            "seed), soft:<s1,..,sK> (a constant soft mix)")
    g.add_argument("--corpus", default=d["dataset"],
                   help="'stdlib', a text file or folder, or synthetic:{recall,copy,drift,mixed}")
    g.add_argument("--max-chars", type=int, default=d["dataset_max_chars"],
                   help="characters of the corpus used")
    g.add_argument("--beta0", type=_beta0, default=d["beta0"],
                   help="prior concentration: a number, one per layer (a,b), or 'learn'")
    g.add_argument("--beta0-init", type=float, default=d["beta0_init"],
                   help="initial beta0 with --beta0 learn")
    g.add_argument("--eta", type=float, default=d["eta"],
                   help="cost sensitivity of the prior mean pi ~ c^-eta")
    g.add_argument("--prior", default=d["prior"], choices=PRIORS,
                   help="power: beta0 * pi with pi ~ c^-eta, guide softplus + a_min; seed: the "
                        "public prototype's eps + beta0 (1 - c), guide beta + softplus")
    g.add_argument("--prior-mean", default=d["prior_mean"], choices=PRIOR_MEANS,
                   help="learn: a per-layer prior mean fitted by type-II ML (empirical Bayes)")
    g.add_argument("--a-min", type=float, default=d["a_min"],
                   help="floor of the guide's concentrations (power prior)")
    g.add_argument("--free-bits", type=float, default=d["free_bits"],
                   help="lambda >= 0: each token's KL per layer counts as max(KL, lambda); "
                        "NOT an ELBO for lambda > 0 (needs --elbo reparam-analytic)")
    g.add_argument("--warm-start", default=d["warm_start"], metavar="RUN_DIR",
                   help="initialise the LM from a trained run (prior-free or fixed), then fit")
    g.add_argument("--elbo", "--estimator", dest="estimator", default=d["estimator"],
                   choices=estimator_names(), metavar="NAME",
                   help=f"ELBO gradient estimator, one of {', '.join(estimator_names())}")
    g.add_argument("--num-particles", type=int, default=d["num_particles"],
                   help="vectorised particles per step")
    g.add_argument("--steps", type=int, default=d["steps"], help="SVI steps")
    g.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="sequences per step: the global batch, shared out over torchrun's "
                        "processes")
    g.add_argument("--micro-batches", type=int, default=d["micro_batches"],
                   help="shards of each process's batch whose gradients are averaged (gradient "
                        "accumulation)")
    g.add_argument("--dtype", default=d["dtype"], choices=list(DTYPES),
                   help="the LM's matmuls under autocast (float16 with loss scaling); the "
                        "router and the Dirichlet maths stay in full precision")
    g.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per sequence")
    g.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                   help="gradient-norm clipping threshold")
    g.add_argument("--kl-anneal-steps", type=int, default=d["kl_anneal_steps"],
                   help="steps over which the KL weight rises to 1 (0: no annealing)")
    g.add_argument("--kl-weight", type=float, default=d["kl_weight"],
                   help="constant factor on the KL term (1: the ELBO; else a beta-VAE ablation)")
    g.add_argument("--gate-final", type=float, default=d["gate_final"],
                   help="final soft-to-hard gate threshold (normalised entropy); 0: off")
    g.add_argument("--tau", type=float, default=d["tau"], help="prior-free softmax temperature")
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="validate every N steps")
    g.add_argument("--eval-batches", type=int, default=d["eval_batches"],
                   help="validation batches per periodic evaluation")
    g.add_argument("--eval-all", action="store_true",
                   help="evaluate on the whole validation split (periodic and final)")
    g.add_argument("--log-every", type=int, default=d["log_every"],
                   help="log the objective's parts (NLL, KL per layer, spread, a0) every N steps")
    g.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="checkpoint every N steps")
    g.add_argument("--seed", type=int, default=d["seed"], help="random seed")


def _configs(args, vocab_size: int):
    from bayes_router.inference.train_config import TrainConfig
    from bayes_router.models.config import TinyLMConfig

    model_cfg = TinyLMConfig(
        vocab_size=vocab_size, d_model=args.d_model, n_heads=args.n_heads,
        n_layers=args.n_layers, max_seq_len=args.max_seq_len, window=args.window,
        chunk_size=args.chunk_size, experts=tuple(args.experts.split(",")),
        shared_qkv=not args.separate_qkv, cost_preset=args.cost_preset,
        tie_weights=not args.untie_head, positions=args.positions)
    train_cfg = TrainConfig(
        router=args.router, estimator=args.estimator, num_particles=args.num_particles,
        beta0=args.beta0, beta0_init=args.beta0_init, eta=args.eta, tau=args.tau,
        prior=args.prior, prior_mean=args.prior_mean, a_min=args.a_min,
        free_bits=args.free_bits, warm_start=args.warm_start, log_every=args.log_every,
        eval_batches=None if args.eval_all else args.eval_batches,
        micro_batches=args.micro_batches, dtype=args.dtype,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        grad_clip=args.grad_clip, kl_anneal_steps=args.kl_anneal_steps,
        kl_weight=args.kl_weight,
        gate_final=args.gate_final, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed, dataset=args.corpus,
        dataset_max_chars=args.max_chars)
    return model_cfg, train_cfg


def _add_out(p, required: bool = True, help: str = "output folder") -> None:
    p.add_argument("--out", required=required, default=None, help=help)
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it holds another command's output")


def _out_dir(args, command: str, default: Path | None = None) -> Path:
    """``--out`` (or ``default``) checked and created: not empty, a writable folder, not
    another command's output unless ``--force``."""
    from bayes_router.experiments.rundir import prepare_output_dir
    from bayes_router.experiments.runs import check_run_dir

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
    from bayes_router.experiments.runs import EVAL_BATCHES, load_data, train_run
    from bayes_router.inference.checkpoint import CHECKPOINT_NAME

    if args.resume and not (Path(args.out) / CHECKPOINT_NAME).exists():
        raise ValueError(f"--resume: {args.out} holds no {CHECKPOINT_NAME}")
    probe_model, probe = _configs(args, vocab_size=128)
    data = load_data(probe, probe_model)  # synthetic tasks take the model's window
    model_cfg, train_cfg = _configs(args, vocab_size=data.vocab_size)
    _out_dir(args, "train")
    if args.resume:
        from bayes_router.inference.checkpoint import check_same_config, load_checkpoint

        check_same_config(load_checkpoint(Path(args.out) / CHECKPOINT_NAME), model_cfg,
                          train_cfg)
    metrics = train_run(model_cfg, train_cfg, Path(args.out), resume=args.resume, data=data,
                        eval_batches=None if args.eval_all else EVAL_BATCHES, device=args.device)
    if metrics is None:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    print(json.dumps({m: {k: metrics[m][k] for k in ("val_nll", "val_bpc",
                                                     "projected_flop_cost", "routing_entropy")}
                      for m in ("soft", "hard")}, indent=2))
    return 0


def _evaluate_arguments(p):
    p.add_argument("run_dir", help="a finished run directory (of `bayes-router train`)")
    from bayes_router.models.router import ROUTING_MODES

    p.add_argument("--routing", default=ROUTING_MODES[0], choices=ROUTING_MODES,
                   help="soft: every expert weighted; hard: each token's argmax expert only; "
                        "gated: hard where the routing uncertainty is below --gate-threshold")
    p.add_argument("--gate-threshold", type=float, default=None,
                   help="normalised-entropy threshold in [0, 1] of --routing gated")
    p.add_argument("--split", default="val", choices=["val", "test"],
                   help="held-out split to evaluate")
    from bayes_router.core.precision import DTYPES

    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the LM's matmuls under autocast (default full precision, whatever "
                        "the run trained in)")
    _add_device(p)


@command("evaluate", "evaluate a trained run under soft, hard or gated routing",
         _evaluate_arguments)
def cmd_evaluate(args) -> int:
    from bayes_router.experiments.runs import evaluate_run

    if args.routing == "gated" and args.gate_threshold is None:
        raise ValueError("--routing gated needs --gate-threshold (normalised entropy in [0, 1])")
    metrics = evaluate_run(Path(args.run_dir), mode=args.routing,
                           gate_threshold=args.gate_threshold, split=args.split,
                           device=args.device, dtype=args.dtype)
    print(json.dumps({k: v for k, v in metrics.items() if k != "expert_share"}, indent=2))
    return 0


def _generate_arguments(p):
    from bayes_router.inference.decoding import GATE_MEASURES, DecodeConfig
    from bayes_router.models.router import ROUTING_MODES

    d = _field_defaults(DecodeConfig)
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
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                   help="tokens to generate per sequence (the prompt and the new tokens, "
                        "less one, must fit the run's --max-seq-len)")
    p.add_argument("--routing", default=d["routing"], choices=ROUTING_MODES,
                   help="soft: every expert read and mixed; hard: each token's argmax expert "
                        "only; gated: hard where the routing uncertainty is below "
                        "--gate-threshold, soft above")
    p.add_argument("--gate-threshold", type=float, default=d["gate_threshold"],
                   help="normalised uncertainty in [0, 1] of --routing gated")
    p.add_argument("--gate-measure", default=d["gate_measure"], choices=GATE_MEASURES,
                   help="the uncertainty the gate reads (aleatoric, epistemic: the Bayesian "
                        "router only); random: a uniform draw, the control at the same soft "
                        "fraction")
    p.add_argument("--temperature", type=float, default=d["temperature"],
                   help="divides the logits before sampling; 0: greedy")
    p.add_argument("--top-k", type=int, default=d["top_k"],
                   help="sample among the K most likely tokens only; None: all")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the sampling: the same seed, the same text")
    p.add_argument("--batch", type=int, default=1, help="sequences generated together")
    _add_device(p)
    _add_out(p, required=False, help="output folder (default RUN_DIR/generate)")


@command("generate", "generate text from a trained run with per-expert caches, under soft, "
         "hard or gated routing", _generate_arguments)
def cmd_generate(args) -> int:
    from bayes_router.experiments.generate import generate_run
    from bayes_router.inference.decoding import DecodeConfig

    if args.routing == "gated" and args.gate_threshold is None:
        raise ValueError("--routing gated needs --gate-threshold (normalised uncertainty in "
                         "[0, 1])")
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, routing=args.routing,
                          gate_threshold=args.gate_threshold, gate_measure=args.gate_measure,
                          temperature=args.temperature, top_k=args.top_k, seed=args.seed)
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


@command("gate-sweep", "validation NLL against the measured decoding step as the gate "
         "threshold moves: the router's uncertainty gate beside the random gate at the same "
         "soft fraction", _gate_sweep_arguments)
def cmd_gate_sweep(args) -> int:
    from bayes_router.experiments.gate_sweep import gate_sweep, gate_sweep_report

    out = _out_dir(args, "gate-sweep", Path(args.run_dir) / "gate-sweep")
    result = gate_sweep(Path(args.run_dir), out,
                        thresholds=None if args.thresholds is None else tuple(args.thresholds),
                        soft_fractions=tuple(args.soft_fractions),
                        eval_batches=args.eval_batches, repeats=args.repeats, seed=args.seed)
    print(gate_sweep_report(result))
    print(f"wrote {out}/gate_sweep.json, {out}/gate_sweep.png and {out}/report.md")
    return 0


def _phase1_arguments(p):
    from bayes_router.experiments.phase1 import PHASE1_ROUTERS

    _add_model_args(p)
    _add_train_args(p, router=False)
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
    from bayes_router.experiments.runs import load_data

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    args.router = "bayesian"  # replaced by each of --routers
    probe_model, probe = _configs(args, vocab_size=128)
    data = load_data(probe, probe_model)  # synthetic tasks take the model's window
    model_cfg, train_cfg = _configs(args, vocab_size=data.vocab_size)
    _out_dir(args, "phase1")
    result = run_phase1(Path(args.out), seeds=args.seeds, model_cfg=model_cfg,
                        train_cfg=train_cfg, report=not args.no_report,
                        routers=tuple(args.routers), jobs=args.jobs, first_seed=args.seed,
                        eval_batches=None if args.eval_all else EVAL_BATCHES_PHASE1,
                        device=args.device)
    print(phase1_table(result))
    print(f"\npower check: {result['power']['reason']}")
    for claim in result["claims"]:
        print(f"- {claim['text']}: {claim['verdict']}")
    print(f"\nwrote {args.out}/phase1.json, {args.out}/phase1.md and "
          f"{args.out}/quality_vs_compute.png")
    return 0


#: Validation batches of 16 windows behind each Phase-1 run's final metrics (--eval-all: all).
EVAL_BATCHES_PHASE1 = 32


def _bench_arguments(p):
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
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--no-decode", action="store_true", help="skip the decoding benchmark")
    mode.add_argument("--decode-only", action="store_true",
                      help="run only the decoding benchmark")


@command("bench", "speed benchmark of the experts, the hard-routed layer and decoding",
         _bench_arguments)
def cmd_bench(args) -> int:
    from bayes_router.bench import format_table, run_benchmark
    from bayes_router.bench.decode import decode_table, run_decode_benchmark

    _out_dir(args, "bench")
    if not args.decode_only:
        results = run_benchmark(Path(args.out), seq_lens=tuple(args.seq_lens),
                                hard_seq_len=args.hard_seq_len, repeats=args.repeats,
                                svi_configs=() if args.no_svi_step else None,
                                flex=not args.no_flex, memory=not args.no_memory)
        print(format_table(results))
        print(f"\nwrote {args.out}/bench.json, {args.out}/bench.png and {args.out}/report.md")
    if not args.no_decode:
        decode = run_decode_benchmark(Path(args.out), contexts=tuple(args.decode_contexts),
                                      batches=tuple(args.decode_batches), repeats=args.repeats,
                                      steps=args.decode_steps)
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
        from bayes_router.experiments.runs import corpus_report

        stats = corpus_report(args.corpus, _out_dir(args, "data"), **options)
    else:
        from bayes_router.data import corpus_statistics, load_corpus

        stats = corpus_statistics(load_corpus(args.corpus, **options))
    print(json.dumps(stats, indent=2))
    return 0


def _analysis_options(p):
    p.add_argument("--max-batches", type=int, default=32,
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
    from bayes_router.experiments.report import analyse_run, report_runs
    from bayes_router.experiments.runs import check_run_dir

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
        results = report_runs(args.run_dirs, out_dir=args.compare, **options)
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
    _add_train_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--values", type=_comma_list(float), default=[0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                   help="comma-separated beta0 values (each > 0); --beta0 is ignored")
    g.add_argument("--seeds", type=int, default=3, help="seeds --seed .. --seed + N - 1")
    _add_out(g, help="sweep folder")
    g.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    g.add_argument("--mark", default=None,
                   help="JSON file with an empirical-Bayes beta0 to mark on the plots")
    _add_device(g)


@command("sweep-beta0", "train and evaluate Bayesian runs over a grid of beta0 values x seeds",
         _sweep_beta0_arguments)
def cmd_sweep_beta0(args) -> int:
    from bayes_router.experiments.runs import load_data
    from bayes_router.experiments.sweep import sweep_beta0, sweep_report

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    args.beta0 = 1.0  # replaced by each sweep value
    probe_model, probe = _configs(args, vocab_size=128)
    data = load_data(probe, probe_model)  # synthetic tasks take the model's window
    model_cfg, train_cfg = _configs(args, vocab_size=data.vocab_size)
    _out_dir(args, "sweep-beta0")
    result = sweep_beta0(args.values, list(range(args.seed, args.seed + args.seeds)),
                         Path(args.out), model_cfg, train_cfg, jobs=args.jobs, mark=args.mark,
                         eval_batches=None if args.eval_all else args.eval_batches,
                         device=args.device)
    print(sweep_report(result))
    print(f"wrote {args.out}/sweep.json and {args.out}/report.md")
    return 0


def _comma_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _variance_arguments(p):
    _add_out(p)
    p.add_argument("--checkpoint", default=None, metavar="RUN_DIR",
                   help="measure a trained Bayesian run (default: train a small model here)")
    p.add_argument("--toy", action="store_true",
                   help="the conjugate toy instead: bias against the exact gradient, and the "
                        "particle sweep's power-law slopes in K")
    p.add_argument("--estimators", type=_comma_names, default=None,
                   help="comma-separated estimator names (default: all registered)")
    p.add_argument("--draws", type=int, default=None,
                   help="gradient estimates M per estimator (default 50; toy 20000)")
    p.add_argument("--num-particles", type=int, default=None,
                   help="particles per estimate (default: each estimator's fewest, 1 or 2)")
    p.add_argument("--particles", type=_comma_list(int), default=[1, 2, 4, 8],
                   help="particle counts of the particle sweep, on the LM or the toy ('' to "
                        "skip)")
    p.add_argument("--particle-estimators", type=_comma_names,
                   default=["reparam-mc", "reparam-analytic", "stl", "score-baseline", "iwae",
                            "dreg"], help="estimators of the particle sweep")
    p.add_argument("--beta0-values", type=_comma_list(float), default=[0.1, 1.0, 10.0],
                   help="beta0 values of the beta0 sweep, guide fixed ('' to skip)")
    p.add_argument("--sweep-estimators", type=_comma_names,
                   default=["reparam-mc", "reparam-analytic", "stl", "score-baseline"],
                   help="estimators of the beta0 and along-training sweeps")
    p.add_argument("--along-training", type=_comma_list(int), default=[],
                   help="training steps at which to measure, training afresh in segments "
                        "(e.g. 0,50,100,200,300; default: skip)")
    p.add_argument("--sweep-draws", type=int, default=None,
                   help="M of the sweeps (default min(draws, 30); toy: draws)")
    p.add_argument("--bootstrap", type=int, default=400,
                   help="bootstrap resamples of the draws behind the intervals of the toy "
                        "sweep's slopes (0: none)")
    p.add_argument("--train-steps", type=int, default=100,
                   help="steps of the small model trained without --checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (and of the model)")


@command("variance", "gradient-variance lab: variance, SNR and cost of every ELBO estimator",
         _variance_arguments)
def cmd_variance(args) -> int:
    from bayes_router.experiments.variance_lab import variance_lab, variance_report

    if args.toy and args.checkpoint:
        raise ValueError("--toy and --checkpoint exclude each other")
    _out_dir(args, "variance")
    result = variance_lab(
        Path(args.out), checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        toy=args.toy, estimators=args.estimators, num_draws=args.draws,
        num_particles=args.num_particles, particles=args.particles,
        particle_estimators=args.particle_estimators, beta0_values=args.beta0_values,
        sweep_estimators=args.sweep_estimators, along_training=args.along_training,
        sweep_draws=args.sweep_draws, train_steps=args.train_steps,
        num_bootstrap=args.bootstrap, seed=args.seed)
    print(variance_report(result))
    print(f"wrote {args.out}/variance.json and {args.out}/report.md")
    return 0


def _fit_beta0_arguments(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished Bayesian run directory")
    from bayes_router.inference.empirical_bayes import METHODS

    p.add_argument("--method", default="both", choices=METHODS,
                   help="svi: type-II ML by SVI on log beta0; minka: the fixed-point M-step on "
                        "the guide's expected statistics; both")
    _add_out(p, required=False, help="output folder (default RUN_DIR/empirical-bayes)")
    p.add_argument("--svi-steps", type=int, default=200,
                   help="SVI steps continuing a fixed-beta0 run with beta0 learned")
    p.add_argument("--beta0-lr", type=float, default=0.05,
                   help="learning rate of log beta0 in those steps")
    p.add_argument("--stat-batches", type=int, default=16,
                   help="training batches of the guide's expected statistics (Minka)")
    p.add_argument("--eval-batches", type=int, default=8,
                   help="validation batches of the held-out ELBO")
    p.add_argument("--update-pi", action="store_true",
                   help="also fit the prior mean pi (Minka, full Dirichlet)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and guide samples")


@command("fit-beta0", "empirical-Bayes beta0 of a run: type-II ML in SVI and Minka's M-step",
         _fit_beta0_arguments)
def cmd_fit_beta0(args) -> int:
    from bayes_router.experiments.beta0_fit import beta0_report, fit_beta0_run

    out = _out_dir(args, "fit-beta0", Path(args.run_dir) / "empirical-bayes")
    result = fit_beta0_run(Path(args.run_dir), args.method, out, svi_steps=args.svi_steps,
                           beta0_lr=args.beta0_lr, stat_batches=args.stat_batches,
                           eval_batches=args.eval_batches, update_pi=args.update_pi,
                           seed=args.seed)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-router",
        description="Bayesian per-token attention routing: train, evaluate, analyse.")
    _add_global_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
