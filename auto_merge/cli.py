"""The `auto-merge` command line. Heavy libraries are imported inside the commands, so `--help` stays instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from auto_merge.errors import AutoMergeError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and getattr(args, "handler", None) is cmd_search:
        reexec_with_fixed_hash_seed()
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        code = args.handler(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the project's user-facing errors: one line (or block), no traceback
        from auto_merge.errors import AutoMergeError

        if not isinstance(err, AutoMergeError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if argv is None and args.handler is cmd_merge:
        exit_without_teardown(code)
    return code


def exit_without_teardown(code: int) -> None:
    """End the process at once, skipping the interpreter's teardown, which after importing torch spends 0.4-0.7 s
    finalising modules and objects (a sixth of a small merge). Only for a command whose work is complete when it
    returns (`merge`: the output is written, closed and renamed into place); the streams are flushed here. Used by
    the console entry point alone (``argv`` None): in-process callers of :func:`main` get their return value."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reexec_with_fixed_hash_seed() -> None:
    """Restart this process with PYTHONHASHSEED=0 unless the hash seed is already fixed.

    SMAC's suggestions depend on the iteration order of sets of strings, which follows Python's per-process hash
    seed: two runs of the same config and seed then diverge after the initial design. The seed can only be fixed
    before the interpreter starts, so the search commands (`auto-merge search`, `python merge.py`) re-execute
    themselves once, with the same arguments; dask workers inherit the variable.
    """
    import os

    if os.environ.get("PYTHONHASHSEED", "random") != "random":
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "PYTHONHASHSEED": "0"})


class UserFacingError(AutoMergeError):
    """A command-line argument that cannot be used: the message is the whole story."""


def _whole_number(minimum: int):
    """argparse type of a whole number >= ``minimum`` (a count: 1; a seed: 0, numpy and torch refuse negatives)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: give a whole number >= {minimum}")
        return value

    return parse


_count, _seed = _whole_number(1), _whole_number(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auto-merge", description="Search merges of fine-tuned LLMs.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    search = commands.add_parser("search", help="run the search an experiment config describes")
    search.add_argument("--config", required=True, type=Path, help="experiment config YAML (exp_config/*.yaml)")
    search.add_argument("--dry-run", action="store_true", help="validate the config and its models, then stop")
    search.add_argument("--overwrite", action="store_true",
                        help="replace the run folder if it holds a run of a different config")
    search.add_argument("--run-name", default=None, help="run folder name under output_path (default: strategy)")
    search.add_argument("--no-model", action="store_true", help="do not write the winning checkpoint")
    _add_memory_flags(search, "the memory plan of the in-memory merges")
    search.set_defaults(handler=cmd_search)

    replay = commands.add_parser("replay", help="turn a found configuration (search_config/*.json) into a model")
    replay.add_argument("found", type=Path, help="search_config JSON (this project's, or the reference's flat one)")
    replay.add_argument("out_dir", type=Path, help="output folder (created atomically)")
    replay.add_argument("--config", type=Path, default=None,
                        help="experiment config (needed for the reference's flat JSON: models, filters, groups)")
    replay.add_argument("--eval", action="store_true", help="also score the model on the configuration's tasks")
    replay.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    replay.add_argument("--include-path", action="append", type=Path, default=None,
                        help="folder of the lm-eval tasks for --eval (repeatable; default: the folders the file "
                             "records, else the project's custom_tasks/)")
    replay.add_argument("--allow-code-execution", action="store_true",
                        help="allow tasks that run model-written code (MBPP, HumanEval style) for --eval")
    replay.add_argument("--as-reference", action="store_true",
                        help="for the reference's flat JSON: decode as the reference did (the model it exported), "
                             "not with this project's semantics; the model card lists what still differs")
    replay.set_defaults(handler=cmd_replay)

    status = commands.add_parser("status", help="where a search stands (running or finished), from its run folder")
    status.add_argument("run_dir", type=Path, help="the run folder, <output_path>/<run name> (e.g. runs/lfs)")
    status.set_defaults(handler=cmd_status)

    validate = commands.add_parser("validate", help="validate an experiment config without loading any model")
    validate.add_argument("--config", required=True, type=Path)
    validate.add_argument("--no-models", action="store_true",
                          help="check the schema only; do not resolve models or read their headers")
    validate.set_defaults(handler=cmd_validate)

    zoo = commands.add_parser("zoo", help="the demo zoo: a tiny base model and experts, shipped with the project")
    zoo_commands = zoo.add_subparsers(title="zoo commands", metavar="ZOO_COMMAND")
    zoo_build = zoo_commands.add_parser(
        "build", help="rebuild base + experts with the project's recipe (into the cache) and compare with the shipped zoo")
    zoo_build.add_argument("--out", type=Path, default=None, help="folder to build into (default: the cache)")
    zoo_build.add_argument("--seed", type=_seed, default=0)
    zoo_build.add_argument("--overwrite", action="store_true", help="rebuild into --out even if it holds a zoo")
    zoo_build.set_defaults(handler=cmd_zoo_build)
    zoo_report = zoo_commands.add_parser("report",
                                         help="score base, experts, merges and layer stacks on the zoo's tasks")
    zoo_report.add_argument("--seed", type=_seed, default=0)
    zoo_report.add_argument("--samples", type=_count, default=30, help="random per-layer-group merges to try")
    zoo_report.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    zoo_report.add_argument("--dir", type=Path, default=None,
                            help="score the zoo in this folder (e.g. a rebuild) instead of the zoo of --seed")
    zoo_report.set_defaults(handler=cmd_zoo_report)
    zoo_path = zoo_commands.add_parser("path", help="print the folder of the zoo of --seed (shipped for seed 0)")
    zoo_path.add_argument("--seed", type=_seed, default=0)
    zoo_path.set_defaults(handler=cmd_zoo_path)

    merge = commands.add_parser("merge", help="merge models as a recipe says (mergekit YAML or the reference's slices)")
    merge.add_argument("recipe", type=Path, help="recipe YAML (mergekit schema or the reference's slice format)")
    merge.add_argument("out_dir", type=Path, help="output folder (created atomically)")
    merge.add_argument("--cuda", action="store_true", help="merge on the GPU")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    merge.add_argument("--out-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB (default 2GB)")
    merge.add_argument("--seed", type=_seed, default=0, help="seed of the random methods (dare_*, della*)")
    merge.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="also read .bin (pickle) checkpoints, with weights_only loading")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_memory_flags(merge, "the memory plan")
    merge.set_defaults(handler=cmd_merge)

    free = commands.add_parser(
        "free", help="FREE-Merging: a Fourier backbone plus one sparse expert per task (one model per task)",
        usage="auto-merge free RECIPE.yml OUT_DIR [--overwrite]\n"
              "       auto-merge free materialise FREE_DIR TASK MODEL_DIR [--overwrite]")
    free.add_argument("arguments", nargs="+", metavar="ARG",
                      help="RECIPE.yml OUT_DIR: build the FREE folder; materialise FREE_DIR TASK MODEL_DIR: write the "
                           "full model of one task")
    free.add_argument("--overwrite", action="store_true", help="replace the output folder if auto-merge wrote it")
    free.add_argument("--no-progress", action="store_true", help="no progress bar")
    free.set_defaults(handler=cmd_free)

    evaluate = commands.add_parser("eval", help="score a checkpoint on lm-eval tasks")
    evaluate.add_argument("--model", required=True, help="model folder, a FREE folder (auto-merge free: each task scored with its own model), "
                               "a .gguf file, or zoo:NAME (base, num, col, wrd)")
    evaluate.add_argument("--tasks", required=True, help="comma-separated task names")
    evaluate.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    evaluate.add_argument("--include-path", action="append", type=Path, default=None,
                          help="folder of lm-eval task YAMLs (repeatable; default: the project's custom_tasks/)")
    evaluate.add_argument("--batch-size", type=_count, default=64)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluate.add_argument("--allow-code-execution", action="store_true",
                          help="allow tasks that run model-written code (MBPP, HumanEval style)")
    evaluate.add_argument("--allow-pickle", action="store_true",
                          help="accept a pickle (.bin) checkpoint (loaded with weights_only=True)")
    evaluate.add_argument("--trust-remote-code", action="store_true",
                          help="let transformers run custom model code shipped in the model folder (auto_map)")
    evaluate.add_argument("--apply-chat-template", nargs="?", const=True, default=False, metavar="NAME",
                          help="format prompts with the tokenizer's chat template (NAME: one of several templates)")
    evaluate.add_argument("--system-instruction", default=None, help="system message before every prompt")
    evaluate.add_argument("--fewshot-as-multiturn", action="store_true",
                          help="with --apply-chat-template: few-shot examples as earlier turns")
    evaluate.add_argument("--log-samples", type=Path, default=None, metavar="FILE.jsonl",
                          help="also write every example (prompt, model output, target, metrics) to this file")
    evaluate.add_argument("--vllm", action="store_true",
                          help="score with vLLM instead of transformers (a CUDA GPU, --device cuda, and the vllm "
                               "extra); compare the two with --log-samples")
    evaluate.add_argument("--gpu-memory-utilization", type=float, default=None,
                          help="with --vllm: vLLM's share of the GPU's memory (default: the config's, 0.4)")
    evaluate.set_defaults(handler=cmd_eval)
    return parser


def _add_memory_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help=f"with --dry-run: {what} for a GPU of this size (e.g. 80GB), whether or not this "
                             f"machine has one")
    parser.add_argument("--host-memory", default=None, metavar="SIZE",
                        help=f"with --dry-run: {what} for this much host memory (default: this machine's)")


def _memory_flags(args) -> tuple[int | None, int | None]:
    """--gpu-memory and --host-memory in bytes (None when not given), checked before anything is loaded."""
    from auto_merge.merge.memory_plan import MEMORY_SIZE_FORM, MemoryPlanError, parse_memory

    sizes = []
    for flag, text in (("--gpu-memory", args.gpu_memory), ("--host-memory", args.host_memory)):
        if text is None:
            sizes.append(None)
            continue
        try:
            sizes.append(parse_memory(text))
        except MemoryPlanError:
            raise UserFacingError(f"{flag} {text!r} is not a memory size: write {MEMORY_SIZE_FORM}") from None
        if not args.dry_run:
            raise UserFacingError(f"{flag} plans memory for a machine you may not have: use it with --dry-run")
    return sizes[0], sizes[1]


def _load_config(path: Path, check_models: bool):
    from auto_merge.config import load_experiment

    return load_experiment(path, check_models=check_models)


def cmd_status(args) -> int:
    from auto_merge.search.status import run_status

    print(run_status(args.run_dir))
    return 0


def cmd_validate(args) -> int:
    config = _load_config(args.config, check_models=not args.no_models)
    print(f"{args.config}: valid ({config.strategy})")
    return 0


def cmd_search(args) -> int:
    gpu_memory, host_memory = _memory_flags(args)
    config = _load_config(args.config, check_models=True)
    print(f"{args.config}: valid ({config.strategy}); models resolved")
    if args.dry_run:
        from auto_merge.search.memory import search_memory_plan

        print(search_memory_plan(config, gpu_memory, host_memory))
        return 0
    from auto_merge.search.driver import run_search

    run_search(args.config, overwrite=args.overwrite, run_name=args.run_name, write_model=not args.no_model,
               config=config)
    return 0


def cmd_replay(args) -> int:
    from auto_merge.search.replay import replay

    report = replay(args.found, args.out_dir, config_path=args.config, overwrite=args.overwrite,
                    evaluate=args.eval, include_paths=args.include_path,
                    allow_code_execution=args.allow_code_execution, as_reference=args.as_reference)
    print(f"wrote {report['out_dir']}")
    for task, score in (report.get("scores") or {}).items():
        print(f"{task}: {score:.4f}")
    return 0


def cmd_zoo_build(args) -> int:
    from auto_merge.zoo.build import compare_with_shipped, ensure_zoo

    try:
        root = ensure_zoo(seed=args.seed, out=args.out, overwrite=args.overwrite)
    except FileExistsError as err:
        raise UserFacingError(str(err)) from None
    print(root)
    differing = compare_with_shipped(root, args.seed)
    if differing is None:
        print(f"no zoo is shipped for seed {args.seed}: `zoo:NAME` with zoo_seed {args.seed} uses this build")
    elif not differing:
        print(f"this build equals the shipped zoo of seed {args.seed} file for file (weights, configs, tokenizer, tasks)")
    else:
        shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
        print(f"this build differs from the shipped zoo of seed {args.seed} in {len(differing)} file(s): {shown}. "
              f"Training follows this machine's CPU kernels and library versions; `zoo:NAME` keeps using the "
              f"shipped files (recorded scores rest on them). `auto-merge zoo report --dir {root}` scores this build.")
    return 0


def cmd_zoo_path(args) -> int:
    from auto_merge.zoo import zoo_root

    print(zoo_root(seed=args.seed))
    return 0


def cmd_zoo_report(args) -> int:
    from auto_merge.zoo.report import run_report

    try:
        report = run_report(seed=args.seed, samples=args.samples, progress=True, root=args.dir)
    except FileNotFoundError as err:
        raise UserFacingError(str(err)) from None
    print(report.render())
    if args.json:
        report.write_json(args.json)
    return 0 if report.quality_bar_met else 1


def cmd_merge(args) -> int:
    from auto_merge.merge.engine import describe_plan, merge_to_disk, prepare_plan
    from auto_merge.merge.io import parse_size
    from auto_merge.formats.recipe_files import load_stages
    from auto_merge.output_dirs import check_replaceable

    try:
        parse_size(args.out_shard_size)
    except ValueError as err:
        raise UserFacingError(f"--out-shard-size: {err}") from None
    gpu_memory, host_memory = _memory_flags(args)
    if len(load_stages(args.recipe)) > 1:  # a mergekit-multi file: its stages in order
        return _merge_stages(args, gpu_memory, host_memory)
    plan = prepare_plan(args.recipe, allow_pickle=args.allow_pickle, pickle_opt_in="pass --allow-pickle")
    if not args.dry_run:  # never one of the sources, or a folder holding one; before any weight is read
        check_replaceable(args.out_dir, overwrite=args.overwrite,
                          protected=[model.path for model in plan.models.values()])
    if args.dry_run:
        device, gpu, host = _dry_run_memory(args, gpu_memory, host_memory)
        print(describe_plan(plan, args.out_shard_size, device=device, gpu=gpu, host=host))
        return 0
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            raise UserFacingError("--cuda: torch sees no CUDA device")
    # An output folder that appeared while merging is an OutputDirError, printed by main().
    result = merge_to_disk(plan, args.out_dir, seed=args.seed, device="cuda" if args.cuda else "cpu",
                           out_shard_size=args.out_shard_size, overwrite=args.overwrite,
                           progress=not args.no_progress, recipe_source=str(args.recipe))
    print(f"{result.out_dir}: {result.tensors} tensors in {result.shards} shard(s), "
          f"{result.bytes_written / 1e6:.1f} MB, {result.seconds:.1f} s")
    return 0


def _dry_run_memory(args, gpu_memory: int | None, host_memory: int | None):
    """The device and capacities `merge --dry-run` plans for: the GPU with --cuda or --gpu-memory (its size given, or
    detected), else the CPU; the host's memory given or detected."""
    from auto_merge.merge.memory_plan import Capacity, gpu_capacity, host_capacity

    on_gpu = args.cuda or gpu_memory is not None
    gpu = Capacity(gpu_memory, "given") if gpu_memory is not None else \
        gpu_capacity("cuda") if args.cuda else Capacity(None, "none")
    return ("cuda" if on_gpu else "cpu"), gpu, host_capacity(host_memory)


def _merge_stages(args, gpu_memory: int | None, host_memory: int | None) -> int:
    """`auto-merge merge` of a file of several recipe documents (cmd_merge's multi-stage half)."""
    from auto_merge.merge.engine import run_stages

    if args.cuda and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise UserFacingError("--cuda: torch sees no CUDA device")

    def report(outcome) -> None:
        stage = outcome.stage
        if args.dry_run:
            print(f"== {stage.label} (document {stage.document + 1}) -> {outcome.out_dir}")
            print(outcome.plan_text)
            return
        result = outcome.result
        print(f"{stage.label}: {result.out_dir}: {result.tensors} tensors in {result.shards} shard(s), "
              f"{result.bytes_written / 1e6:.1f} MB, {result.seconds:.1f} s", flush=True)

    run_stages(args.recipe, args.out_dir, seed=args.seed, device="cuda" if args.cuda else "cpu",
               out_shard_size=args.out_shard_size, overwrite=args.overwrite, progress=not args.no_progress,
               allow_pickle=args.allow_pickle, pickle_opt_in="pass --allow-pickle", dry_run=args.dry_run,
               on_stage=report, dry_run_memory=_dry_run_memory(args, gpu_memory, host_memory) if args.dry_run else None)
    return 0


def cmd_free(args) -> int:
    from auto_merge.merge.free import build_free
    from auto_merge.merge.free_folder import materialise

    arguments = args.arguments
    if arguments[0] == "materialise":
        if len(arguments) != 4:
            raise UserFacingError("usage: auto-merge free materialise FREE_DIR TASK MODEL_DIR [--overwrite]")
        out = materialise(Path(arguments[1]), arguments[2], Path(arguments[3]), overwrite=args.overwrite)
        print(f"wrote {out} (task {arguments[2]})")
        return 0
    if len(arguments) != 2:
        raise UserFacingError("usage: auto-merge free RECIPE.yml OUT_DIR [--overwrite] (or: auto-merge free "
                              "materialise FREE_DIR TASK MODEL_DIR)")
    result = build_free(Path(arguments[0]), Path(arguments[1]), overwrite=args.overwrite,
                        progress=not args.no_progress)
    for task, entry in result.tasks.items():
        print(f"{task}: expert of {entry['model']}, {entry['entries']} of {entry['of']} entries "
              f"({entry['entries'] / max(1, entry['of']):.2%}), scale {entry['scale']:.4g}")
    print(f"wrote {result.out_dir} in {result.seconds:.1f} s")
    return 0


def cmd_eval(args) -> int:
    import functools

    from auto_merge.evaluation.lm_eval_runner import ChatFormat, evaluate_checkpoint, format_table
    from auto_merge.models.inspect import ModelInspectionError, PickleRefusedError, has_chat_template, inspect_model

    model_path = _resolve_model_arg(args.model)
    free = None
    if (model_path / "free.json").is_file():  # a FREE-Merging folder: each task is scored with its own model
        from auto_merge.merge.free_folder import FreeFolder

        free = FreeFolder.open(model_path)
        model_path = free.backbone
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserFacingError(f"--tasks {args.tasks!r} names no task: give comma-separated lm-eval task names, "
                              f"e.g. zoo_num,zoo_col")
    limit = args.limit
    if limit is not None and not limit > 0:
        raise UserFacingError(f"--limit {args.limit:g}: give a number of examples per task (>= 1) or a fraction "
                              f"in (0, 1)")
    if limit is not None and limit >= 1:
        limit = int(limit)
    vllm = None
    if args.vllm:
        from auto_merge.evaluation.backends import VllmOptions, vllm_problem

        if free is not None:
            raise UserFacingError("--vllm: a FREE folder scores each task with its own model; --vllm scores one model")
        share = args.gpu_memory_utilization
        if share is None:
            share = VllmOptions.gpu_memory_utilization
        elif not 0 < share < 1:
            raise UserFacingError(f"--gpu-memory-utilization {share:g}: give a share in (0, 1)")
        problem = vllm_problem(args.device, device_key="--device")
        if problem is not None:
            raise UserFacingError(f"--vllm: {problem}")
        vllm = VllmOptions(str(model_path), dtype=args.dtype, gpu_memory_utilization=share,
                           trust_remote_code=args.trust_remote_code)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserFacingError(f"--device {args.device}: torch sees no CUDA device; use --device cpu")
    try:  # headers and config only: a truncated, pickle-only or custom-code folder is refused before loading
        info = inspect_model(args.model, model_path, allow_pickle=args.allow_pickle)
    except PickleRefusedError as err:
        raise UserFacingError(f"--model {args.model}: {err.with_opt_in('pass --allow-pickle')}") from None
    except ModelInspectionError as err:
        raise UserFacingError(f"--model {args.model}: {err}") from None
    if args.apply_chat_template and not has_chat_template(model_path):
        raise UserFacingError(f"--model {args.model}: its tokenizer has no chat template (no chat_template in "
                              f"tokenizer_config.json, no chat_template.jinja); drop --apply-chat-template")
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise UserFacingError("--fewshot-as-multiturn needs --apply-chat-template")
    if info.config.get("auto_map") and not args.trust_remote_code:
        raise UserFacingError(f"--model {args.model}: config.json names custom model code (auto_map); pass "
                              f"--trust-remote-code to run it, or use a model of an architecture transformers knows")
    samples: list | None = None
    if args.log_samples is not None:
        if args.log_samples.exists() or not args.log_samples.parent.is_dir():
            raise UserFacingError(f"--log-samples {args.log_samples}: "
                                  + ("exists; give a new file" if args.log_samples.exists()
                                     else "its folder does not exist"))
        samples = []
    if free is not None:
        for route, routed in free.routes(tasks).items():
            print(f"{', '.join(routed)}: " + (f"backbone + expert {route}" if route else "backbone alone"))
    try:
        score = free.evaluate if free is not None else functools.partial(evaluate_checkpoint, model_path, vllm=vllm)
        results = score(tasks, limit=limit, batch_size=args.batch_size, device=args.device,
                        include_paths=args.include_path, dtype=args.dtype,
                        allow_code_execution=args.allow_code_execution,
                        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                        chat=ChatFormat(args.apply_chat_template, args.system_instruction,
                                        args.fewshot_as_multiturn),
                        samples=samples)
    except FileNotFoundError as err:
        raise UserFacingError(str(err)) from None
    for task in tasks:
        if task in results:
            print(f"\n{task}")
            print(format_table([(str(args.model), results[task])], sorted(results[task])))
    if samples is not None:
        import json

        from auto_merge.output_dirs import write_text_atomic

        write_text_atomic(args.log_samples, "".join(json.dumps(record, default=str) + "\n" for record in samples))
        print(f"\nwrote {len(samples)} examples to {args.log_samples}")
    return 0


def _resolve_model_arg(ref: str) -> Path:
    from auto_merge.zoo.paths import ZOO_REF_PREFIX

    if ref.startswith(ZOO_REF_PREFIX):
        from auto_merge.zoo import zoo_model_path

        try:
            return zoo_model_path(ref[len(ZOO_REF_PREFIX):])
        except ValueError as err:
            raise UserFacingError(str(err)) from None
    from auto_merge.models.gguf import gguf_model_folder, is_gguf_reference

    path = Path(ref)
    if is_gguf_reference(ref):
        return gguf_model_folder(path)
    if not path.is_dir():
        raise UserFacingError(f"--model {ref}: no such folder (give a local model folder, a .gguf file or zoo:NAME)")
    return path


if __name__ == "__main__":
    sys.exit(main())
