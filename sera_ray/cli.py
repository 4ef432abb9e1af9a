"""The `sera-ray` command: train, demo, data validate, bench quality."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Ray Data logs every dataset execution at INFO; the stages already log one line each.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for noisy in ("transformers", "deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _train(args: argparse.Namespace) -> int:
    from sera_ray.config import load_config
    from sera_ray.driver import run_sera

    config = load_config(args.config, args.overrides)
    summary = run_sera(config)
    print(
        json.dumps(
            {
                "run_dir": summary.run_dir,
                "iterations": len(summary.iterations),
                "weight_sync_verified": summary.weight_sync_verified,
                "stage_seconds": summary.stage_seconds,
            },
            indent=2,
        )
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from sera_ray.data.validate import format_report, validate_path

    report = validate_path(args.path, split=args.split)
    print(format_report(report))
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from sera_ray.toy.demo import format_table, run_demo

    report = run_demo(out=args.out, overrides=args.overrides, small=args.small)
    print(format_table(report))
    return 0 if report["weight_sync_verified"] else 1


def _bench_quality(args: argparse.Namespace) -> int:
    from sera_ray.toy.bench import run_quality_bench

    run_quality_bench(out=args.out, seeds=args.seeds, small=args.small, resume=not args.fresh)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sera-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run SeRA on the cluster in RAY_ADDRESS (or local)")
    train.add_argument("--config", required=True, help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    train.set_defaults(fn=_train)

    demo = commands.add_parser("demo", help="DPO vs SeRA-DPO on the toy world, end to end")
    demo.add_argument("--out", default="runs/demo", help="where report.json and report.png go")
    demo.add_argument("--small", action="store_true", help="fewer prompts and steps (CI)")
    demo.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the runs")
    demo.set_defaults(fn=_demo)

    data = commands.add_parser("data", help="offline preference data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    validate = data_commands.add_parser("validate", help="check every row of a dataset")
    validate.add_argument("path", help="JSONL, Parquet, or a saved `datasets` directory")
    validate.add_argument("--split", default=None, help="split of a saved DatasetDict")
    validate.set_defaults(fn=_validate)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    quality = bench_commands.add_parser("quality", help="gold reward of SeRA vs its DAA")
    quality.add_argument("--out", default="runs/bench", help="where bench.json and bench.png go")
    quality.add_argument("--seeds", type=int, default=3)
    quality.add_argument("--small", action="store_true", help="a short grid (CI)")
    quality.add_argument("--fresh", action="store_true", help="ignore finished cells")
    quality.set_defaults(fn=_bench_quality)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except Exception as error:  # a clear one-line reason, the traceback only with -v
        from sera_ray.cluster import InsufficientResourcesError
        from sera_ray.config import ConfigError
        from sera_ray.data.problems import DataError

        if isinstance(error, ConfigError | DataError | InsufficientResourcesError):
            print(f"sera-ray: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
