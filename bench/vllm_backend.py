"""Benchmark: trial time of the vLLM backend against the transformers backend on a GSM-style generation task, and
how often their greedy outputs agree.

    python bench/vllm_backend.py --shape 7b                # a CUDA GPU with vllm installed (pip install -e '.[vllm]')
    python bench/vllm_backend.py --shape tiny --cpu-check  # the script itself on the CPU, over tests/fake_vllm

A Llama model of the given shape (`bench/make_models.py`: tiny, 170m, 7b; random weights, written once to
--work-dir in --dtype) with the demo zoo's tokenizer scores --examples GSM-style questions (zero-shot, "Let's think
step by step", up to --max-gen-toks new tokens, stop at "Question:"). Random weights rarely stop early, so every
example generates about --max-gen-toks tokens: a fixed, heavy generation load, as on GSM8K.

Each "trial" is what a search does per candidate: new weights are written into the live model (here: a seeded
perturbation of every tensor), then every example is scored. Printed per backend: the engine's start-up seconds, the
seconds per trial (median of --trials; vLLM's includes loading the weights into its engine), and per trial the
share of examples whose generated text is identical in both backends (greedy decoding, same weights).
`--cpu-check` replaces vLLM by the CPU test double of its API (tests/fake_vllm); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import make_models  # noqa: E402
import torch  # noqa: E402

ZOO_TOKENIZER = REPO / "auto_merge" / "zoo" / "shipped" / "seed0" / "base"
TASK = "bench_gsm_style"


def write_model(folder: Path, shape: str, dtype: torch.dtype, device: str) -> None:
    """A random Llama model of ``shape`` with the zoo's tokenizer (its vocabulary sets the model's)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if (folder / "model.safetensors").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(ZOO_TOKENIZER)
    vocab = len(tokenizer)
    make_models.CONFIGS[shape] = dict(make_models.CONFIGS[shape], vocab_size=vocab)
    config = dict(make_models.hf_config(shape), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, torch_dtype=str(dtype).removeprefix("torch."))
    state = make_models.synthetic_state(shape, seed=0, device=device, dtype=dtype)
    save_file({name: tensor.contiguous().cpu() for name, tensor in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    del state
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ZOO_TOKENIZER / name, folder / name)


def write_task(folder: Path, examples: int, max_gen_toks: int) -> None:
    """GSM-style word problems (seeded), scored by exact match of the final number."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for _ in range(examples):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        question = (f"A shop sells {a} apples in the morning and {b} apples in the afternoon. Each apple costs {c} "
                    f"dollars. How many dollars does the shop take in that day?")
        rows.append({"question": question, "answer": str((a + b) * c)})
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'data.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer: Let's think step by step."
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


@torch.no_grad()
def perturb(model, trial: int) -> None:
    """A new candidate's weights: every tensor of the start weights plus seeded noise (1 % of its scale)."""
    for index, (name, parameter) in enumerate(sorted(model.named_parameters())):
        generator = torch.Generator(device=parameter.device).manual_seed(trial * 100003 + index)
        noise = torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=torch.float32)
        parameter.add_((0.01 * parameter.float().abs().mean() * noise).to(parameter.dtype))


def _generated_text(sample: dict) -> str:
    """The text a generation request produced (lm-eval logs it as [[text]] before filters)."""
    raw = sample["raw_output"]
    while isinstance(raw, list) and raw:
        raw = raw[0]
    return str(raw)


def run(args) -> dict:
    from auto_merge.evaluation.backends import VllmOptions
    from auto_merge.evaluation.lm_eval_runner import LiveEvaluator, TaskSuite, load_checkpoint

    device = "cpu" if args.cpu_check else "cuda"
    dtype = getattr(torch, args.dtype)
    work = Path(args.work_dir)
    folder = work / f"model_{args.shape}_{args.dtype}"
    write_model(folder, args.shape, dtype, device)
    write_task(work / "task", args.examples, args.max_gen_toks)
    suite = TaskSuite([TASK], [work / "task"])
    model, tokenizer = load_checkpoint(folder, dtype=args.dtype, device=device)
    start_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    started = time.perf_counter()
    evaluators = {"transformers": LiveEvaluator(model, tokenizer, suite, batch_size=args.batch_size)}
    startup = {"transformers": time.perf_counter() - started}
    started = time.perf_counter()
    share = args.gpu_memory_utilization or VllmOptions.gpu_memory_utilization
    evaluators["vllm"] = LiveEvaluator(model, tokenizer, suite, vllm=VllmOptions(
        str(folder), dtype=args.dtype, enforce_eager=args.enforce_eager, gpu_memory_utilization=share))
    startup["vllm"] = time.perf_counter() - started
    seconds = {name: [] for name in evaluators}
    agreement, generated_tokens = [], []
    for trial in range(args.trials):
        model.load_state_dict(start_weights)
        perturb(model, trial)
        outputs = {}
        for name, evaluator in evaluators.items():
            if device == "cuda":
                torch.cuda.synchronize()
            samples: list = []
            begun = time.perf_counter()
            evaluator.evaluate(samples=samples)
            seconds[name].append(time.perf_counter() - begun)
            outputs[name] = {s["doc_id"]: _generated_text(s) for s in samples}
        same = sum(outputs["vllm"][doc] == text for doc, text in outputs["transformers"].items())
        agreement.append(same / len(outputs["transformers"]))
        generated_tokens.append(statistics.fmean(len(tokenizer(text)["input_ids"])
                                                 for text in outputs["transformers"].values()))
        print(f"trial {trial}: transformers {seconds['transformers'][-1]:.2f} s, vllm {seconds['vllm'][-1]:.2f} s, "
              f"identical outputs {agreement[-1]:.0%}, mean generated tokens {generated_tokens[-1]:.0f}", flush=True)
    return {
        "shape": args.shape, "dtype": args.dtype, "examples": args.examples, "max_gen_toks": args.max_gen_toks,
        "trials": args.trials, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (--cpu-check)",
        "startup_seconds": {k: round(v, 2) for k, v in startup.items()},
        "median_trial_seconds": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "trial_seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "identical_outputs": [round(x, 4) for x in agreement],
        "mean_generated_tokens": [round(x, 1) for x in generated_tokens],
        "vllm_weight_loads": evaluators["vllm"].backend.loads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(make_models.CONFIGS), default="7b")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="the transformers backend's batch size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="default: the config's, 0.4")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--work-dir", default=os.environ.get("TMPDIR", "/tmp") + "/auto_merge_vllm_bench")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--cpu-check", action="store_true",
                        help="run on the CPU over tests/fake_vllm (checks the script; the figures mean nothing)")
    args = parser.parse_args()
    if args.cpu_check:
        sys.path.insert(0, str(REPO / "tests" / "fake_vllm"))
        from auto_merge.evaluation import backends

        backends.vllm_problem = lambda device=None, device_key=None: None
    else:
        from auto_merge.evaluation.backends import vllm_problem

        problem = vllm_problem()
        if problem is not None:
            sys.exit(f"bench/vllm_backend.py: {problem}")
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
