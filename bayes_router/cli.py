"""The ``bayes-router`` command: the only place that turns arguments into configurations."""

from __future__ import annotations

import argparse
import json
import logging
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


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}"
                                         ) from None


# ------------------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--n-heads", type=int, default=4)
    g.add_argument("--n-layers", type=int, default=2)
    g.add_argument("--max-seq-len", type=int, default=128)
    g.add_argument("--window", type=int, default=16)
    g.add_argument("--chunk-size", type=int, default=32)
    g.add_argument("--experts", default="full,linear,local")
    g.add_argument("--separate-qkv", action="store_true",
                   help="one q/k/v/out projection per expert (default: shared)")
    g.add_argument("--cost-preset", default="seed", choices=["seed", "flops"],
                   help="seed: the paper's fixed [1.0, 0.15, 0.30]; flops: from the FLOP model")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--router", default="bayesian", choices=["bayesian", "prior-free"])
    g.add_argument("--corpus", default="stdlib",
                   help="'stdlib', a text file or folder, or synthetic:{recall,copy,drift,mixed}")
    g.add_argument("--max-chars", type=int, default=1_000_000)
    g.add_argument("--beta0", type=_beta0, default=1.0,
                   help="prior concentration: a number, one per layer (a,b), or 'learn'")
    g.add_argument("--beta0-init", type=float, default=1.0)
    g.add_argument("--eta", type=float, default=1.0)
    g.add_argument("--elbo", "--estimator", dest="estimator", default="reparam-analytic")
    g.add_argument("--num-particles", type=int, default=1)
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--kl-anneal-steps", type=int, default=0)
    g.add_argument("--gate-final", type=float, default=0.0,
                   help="final soft-to-hard gate threshold (normalised entropy); 0: off")
    g.add_argument("--tau", type=float, default=1.0, help="prior-free softmax temperature")
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)


def _configs(args, vocab_size: int):
    from bayes_router.inference.train import TrainConfig
    from bayes_router.models.config import TinyLMConfig

    model_cfg = TinyLMConfig(
        vocab_size=vocab_size, d_model=args.d_model, n_heads=args.n_heads,
        n_layers=args.n_layers, max_seq_len=args.max_seq_len, window=args.window,
        chunk_size=args.chunk_size, experts=tuple(args.experts.split(",")),
        shared_qkv=not args.separate_qkv, cost_preset=args.cost_preset)
    train_cfg = TrainConfig(
        router=args.router, estimator=args.estimator, num_particles=args.num_particles,
        beta0=args.beta0, beta0_init=args.beta0_init, eta=args.eta, tau=args.tau,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        grad_clip=args.grad_clip, kl_anneal_steps=args.kl_anneal_steps,
        gate_final=args.gate_final, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed, dataset=args.corpus,
        dataset_max_chars=args.max_chars)
    return model_cfg, train_cfg


def _train_arguments(p):
    _add_model_args(p)
    _add_train_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true")


@command("train", "train a Bayesian or prior-free routed LM into a run directory",
         _train_arguments)
def cmd_train(args) -> int:
    from bayes_router.experiments.runs import load_data, train_run

    if args.resume and not (Path(args.out) / "checkpoint.pt").exists():
        raise ValueError(f"--resume: {args.out} holds no checkpoint.pt")
    _, probe = _configs(args, vocab_size=128)
    data = load_data(probe)
    model_cfg, train_cfg = _configs(args, vocab_size=data.vocab_size)
    if args.resume:
        from bayes_router.inference.train import check_same_config, load_checkpoint

        check_same_config(load_checkpoint(Path(args.out) / "checkpoint.pt"), model_cfg,
                          train_cfg)
    metrics = train_run(model_cfg, train_cfg, Path(args.out), resume=args.resume, data=data)
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    print(json.dumps({m: {k: metrics[m][k] for k in ("val_nll", "val_bpc",
                                                     "projected_flop_cost", "routing_entropy")}
                      for m in ("soft", "hard")}, indent=2))
    return 0


def _evaluate_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--routing", default="soft", choices=["soft", "hard", "gated"])
    p.add_argument("--gate-threshold", type=float, default=None)
    p.add_argument("--split", default="val", choices=["val", "test"])


@command("evaluate", "evaluate a trained run under soft, hard or gated routing",
         _evaluate_arguments)
def cmd_evaluate(args) -> int:
    from bayes_router.experiments.runs import evaluate_run

    if args.routing == "gated" and args.gate_threshold is None:
        raise ValueError("--routing gated needs --gate-threshold (normalised entropy in [0, 1])")
    metrics = evaluate_run(Path(args.run_dir), mode=args.routing,
                           gate_threshold=args.gate_threshold, split=args.split)
    print(json.dumps({k: v for k, v in metrics.items() if k != "expert_share"}, indent=2))
    return 0


def _phase1_arguments(p):
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)


@command("phase1", "the Phase-1 comparison of Bayesian and prior-free routing",
         _phase1_arguments)
def cmd_phase1(args) -> int:
    from bayes_router.experiments.phase1 import phase1_table, run_phase1

    result = run_phase1(Path(args.out), seeds=args.seeds, steps=args.steps)
    print(phase1_table(result))
    print()
    for claim in result["claims"]:
        print(f"- {claim['text']}: {claim['verdict']}")
    print(f"\nwrote {args.out}/phase1.json and {args.out}/phase1.md")
    return 0


def _bench_arguments(p):
    p.add_argument("--out", required=True)
    p.add_argument("--seq-lens", type=lambda s: s.split(","),
                   default=["128", "512", "1024", "2048", "4096"])


@command("bench", "speed benchmark of the experts and the hard-routed layer", _bench_arguments)
def cmd_bench(args) -> int:
    from bayes_router.bench import format_table, run_benchmark

    results = run_benchmark(Path(args.out), seq_lens=tuple(int(t) for t in args.seq_lens))
    print(format_table(results))
    print(f"\nwrote {args.out}/bench.json")
    return 0


def _data_arguments(p):
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--max-chars", type=int, default=None)


@command("data", "print statistics of a corpus", _data_arguments)
def cmd_data(args) -> int:
    from bayes_router.data import corpus_statistics, load_corpus

    corpus = load_corpus(args.corpus, max_chars=args.max_chars)
    print(json.dumps(corpus_statistics(corpus), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-router",
        description="Bayesian per-token attention routing: train, evaluate, analyse.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if arguments is not None:
            arguments(p)
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
    try:
        return fn(args)
    except (ValueError, TypeError) as error:
        print(f"bayes-router {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
