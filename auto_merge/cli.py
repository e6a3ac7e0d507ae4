"""The `auto-merge` command line. Heavy libraries are imported inside the commands, so `--help` stays instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


class UserFacingError(Exception):
    """An error whose message is the whole story: printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auto-merge", description="Search merges of fine-tuned LLMs.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    search = commands.add_parser("search", help="run the search an experiment config describes")
    search.add_argument("--config", required=True, type=Path, help="experiment config YAML (exp_config/*.yaml)")
    search.add_argument("--dry-run", action="store_true", help="validate the config and its models, then stop")
    search.set_defaults(handler=cmd_search)

    validate = commands.add_parser("validate", help="validate an experiment config without loading any model")
    validate.add_argument("--config", required=True, type=Path)
    validate.add_argument("--no-models", action="store_true",
                          help="check the schema only; do not resolve models or read their headers")
    validate.set_defaults(handler=cmd_validate)

    zoo = commands.add_parser("zoo", help="the demo zoo: a tiny base model and experts built on this machine")
    zoo_commands = zoo.add_subparsers(title="zoo commands", metavar="ZOO_COMMAND")
    zoo_build = zoo_commands.add_parser("build", help="build (or find cached) base + experts")
    zoo_build.add_argument("--out", type=Path, default=None, help="folder to build into (default: the cache)")
    zoo_build.add_argument("--seed", type=int, default=0)
    zoo_build.add_argument("--overwrite", action="store_true", help="rebuild into --out even if it holds a zoo")
    zoo_build.set_defaults(handler=cmd_zoo_build)
    zoo_report = zoo_commands.add_parser("report", help="score base, experts and merges on the zoo's tasks")
    zoo_report.add_argument("--seed", type=int, default=0)
    zoo_report.add_argument("--samples", type=int, default=30, help="random per-layer-group merges to try")
    zoo_report.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    zoo_report.set_defaults(handler=cmd_zoo_report)
    zoo_path = zoo_commands.add_parser("path", help="print the folder of a built zoo (building it if needed)")
    zoo_path.add_argument("--seed", type=int, default=0)
    zoo_path.set_defaults(handler=cmd_zoo_path)

    evaluate = commands.add_parser("eval", help="score a checkpoint on lm-eval tasks")
    evaluate.add_argument("--model", required=True, help="model folder, or zoo:NAME (base, num, rev, col)")
    evaluate.add_argument("--tasks", required=True, help="comma-separated task names")
    evaluate.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    evaluate.add_argument("--include-path", action="append", type=Path, default=None,
                          help="folder of lm-eval task YAMLs (repeatable; default: the project's custom_tasks/)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluate.set_defaults(handler=cmd_eval)
    return parser


def _load_config(path: Path, check_models: bool):
    from auto_merge.config import ConfigError, load_experiment

    try:
        return load_experiment(path, check_models=check_models)
    except ConfigError as err:
        raise UserFacingError(str(err)) from None


def cmd_validate(args) -> int:
    config = _load_config(args.config, check_models=not args.no_models)
    print(f"{args.config}: valid ({config.strategy})")
    return 0


def cmd_search(args) -> int:
    config = _load_config(args.config, check_models=True)
    print(f"{args.config}: valid ({config.strategy}); models resolved")
    if args.dry_run:
        return 0
    raise UserFacingError(
        f"the search driver for strategy {config.strategy!r} is not part of this version yet; "
        "use --dry-run to validate, `auto-merge zoo report` to see the zoo's merges"
    )


def cmd_zoo_build(args) -> int:
    from auto_merge.zoo.build import ensure_zoo

    try:
        root = ensure_zoo(seed=args.seed, out=args.out, overwrite=args.overwrite)
    except FileExistsError as err:
        raise UserFacingError(str(err)) from None
    print(root)
    return 0


def cmd_zoo_path(args) -> int:
    from auto_merge.zoo import zoo_root

    print(zoo_root(seed=args.seed))
    return 0


def cmd_zoo_report(args) -> int:
    from auto_merge.zoo.report import run_report

    report = run_report(seed=args.seed, samples=args.samples, progress=True)
    print(report.render())
    if args.json:
        report.write_json(args.json)
    return 0 if report.quality_bar_met else 1


def cmd_eval(args) -> int:
    from auto_merge.evaluation.lm_eval_runner import TaskNotFoundError, evaluate_checkpoint, format_table

    model_path = _resolve_model_arg(args.model)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        results = evaluate_checkpoint(model_path, tasks, limit=limit, batch_size=args.batch_size, device=args.device,
                                      include_paths=args.include_path, dtype=args.dtype)
    except (TaskNotFoundError, FileNotFoundError) as err:
        raise UserFacingError(str(err)) from None
    for task in tasks:
        if task in results:
            print(f"\n{task}")
            print(format_table([(str(args.model), results[task])], sorted(results[task])))
    return 0


def _resolve_model_arg(ref: str) -> Path:
    from auto_merge.zoo.paths import ZOO_REF_PREFIX

    if ref.startswith(ZOO_REF_PREFIX):
        from auto_merge.zoo import zoo_model_path

        try:
            return zoo_model_path(ref[len(ZOO_REF_PREFIX):])
        except ValueError as err:
            raise UserFacingError(str(err)) from None
    path = Path(ref)
    if not path.is_dir():
        raise UserFacingError(f"--model {ref}: no such folder (give a local model folder or zoo:NAME)")
    return path


if __name__ == "__main__":
    sys.exit(main())
