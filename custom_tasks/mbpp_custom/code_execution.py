"""pass@1 for MBPP-style tasks: run the model's program against the task's assert statements in a child process.

The program runs in a separate Python interpreter (isolated mode, empty working folder, its own process group)
under a wall-clock timeout and resource limits (address space, CPU time, file size, no core dumps). This keeps a
crash, a hang or a memory blow-up away from the evaluator, but it is not a security sandbox: run code-executing
tasks only in a disposable environment. lm-eval refuses to run this task (`unsafe_code: true`) unless code
execution is confirmed, and auto-merge confirms it only when the experiment config opts in.

Unlike lm-eval's built-in `mbpp`, nothing is loaded from a hub (its metric downloads HF evaluate's `code_eval`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 << 30
_FENCED = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)

# Applies the limits inside the child, before the program runs (a preexec_fn in a threaded parent can deadlock).
_LAUNCHER = """
import resource, runpy, sys
memory, cpu = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def extract_code(generation: str) -> str:
    """The program in a model's output: the first fenced block if there is one, else the text itself, without
    MBPP's [BEGIN]/[DONE] markers."""
    text = str(generation)
    fenced = _FENCED.search(text)
    if fenced:
        text = fenced.group(1)
    return text.replace("[BEGIN]", "").split("[DONE]")[0].strip("\n")


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when `program` exits with status 0 within `timeout_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="auto_merge_code_") as folder:
        script = Path(folder) / "program.py"
        script.write_text(program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "HOME": folder}
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _LAUNCHER, str(script), str(MEMORY_LIMIT_BYTES),
             str(int(timeout_s) + 1)],
            cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            return process.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the program's own children too
            process.wait()
            return False


def pass_at_1(references, predictions, timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """lm-eval metric: 1.0 when the (single) prediction passes the reference tests, else 0.0."""
    tests = references[0]
    program = extract_code(predictions[0])
    return 1.0 if run_program(f"{program}\n\n{tests}\n", float(timeout)) else 0.0
