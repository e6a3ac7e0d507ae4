"""The engine that runs the evaluated model: transformers (lm-eval's HFLM, the default) or vLLM (`evaluation.vllm`).

Either way the merge engine writes every candidate into one live `transformers` model. With transformers, that model
is the one evaluated. With vLLM, each process keeps one vLLM engine (lm-eval's ``vllm`` model, run inside this
process) and, before each evaluation, the live model's tensors are loaded into the engine in place (the model's own
``load_weights``: no checkpoint on disk, no re-initialisation) and the engine's prefix cache is reset, so no prompt
cached for the previous candidate is reused. A candidate of another depth (DIS, layer pruning) needs an engine of
that depth: the engine is then rebuilt once for it (with placeholder weights, replaced by the same in-place load).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

VLLM_INSTALL = "pip install 'auto-merge[vllm]' (on a machine with a CUDA GPU)"
# Config keys whose value differs between the live model's depth and the folder's: the engine is built for the
# live model's values (vLLM's `hf_overrides`).
_DEPTH_KEYS = ("num_hidden_layers", "layer_types")


class BackendError(RuntimeError):
    """The asked-for evaluation backend cannot run here (not installed, no GPU)."""


def vllm_problem(device: str | None = None, device_key: str = "evaluation.device") -> str | None:
    """Why the vLLM backend cannot run on this machine (or on ``device``, set by ``device_key``), or None when it
    can."""
    if importlib.util.find_spec("vllm") is None:
        return f"the vllm package is not installed; install it with {VLLM_INSTALL}"
    if device is not None and device not in ("auto", "cuda") and not device.startswith("cuda:"):
        return f"vLLM runs on a CUDA GPU, and {device_key} is {device!r}"
    import torch

    if not torch.cuda.is_available():
        return "vLLM runs on a CUDA GPU, and torch sees none on this machine"
    return None


@dataclass(frozen=True)
class VllmOptions:
    """How each process's vLLM engine is built (from `EvaluationSettings`; see :func:`vllm_options`)."""

    folder: str  # a model folder whose config and tokenizer the engine takes (the base model)
    dtype: str = "auto"
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.4  # the config's default (EvaluationSettings; a test keeps them equal)
    seed: int = 0
    trust_remote_code: bool = False
    max_length: int | None = None


def vllm_options(settings, folder: str | os.PathLike, *, seed: int = 0,
                 trust_remote_code: bool = False) -> VllmOptions | None:
    """The vLLM options of an `EvaluationSettings`, or None when it asks for transformers."""
    if not settings.vllm:
        return None
    return VllmOptions(str(folder), dtype=settings.torch_dtype, enforce_eager=settings.enforce_eager,
                       gpu_memory_utilization=settings.gpu_memory_utilization, seed=seed,
                       trust_remote_code=trust_remote_code)


class ForwardClock:
    """Seconds spent inside an lm-eval model's forward passes and generation (its `_model_call` and
    `_model_generate`, timed once per model object; synchronised on CUDA so that queued kernels are counted)."""

    def __init__(self, synchronise=None):
        self.seconds = 0.0
        self._synchronise = synchronise

    def time(self, lm) -> None:
        for name in ("_model_call", "_model_generate"):
            if hasattr(lm, name):
                setattr(lm, name, self._timed(getattr(lm, name)))

    def _timed(self, call):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                output = call(*args, **kwargs)
                if self._synchronise is not None:
                    self._synchronise()
                return output
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class TransformersBackend:
    """lm-eval's HFLM around the live model itself: the merge engine's writes are what it evaluates."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, batch_size: int | str, max_length: int | None):
        import torch
        from lm_eval.models.huggingface import HFLM

        # With a model object HFLM takes the device from the model itself.
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.device_type = self.lm.device.type
        self.clock = ForwardClock(torch.cuda.synchronize if self.device_type == "cuda" else None)
        self.clock.time(self.lm)
        self.lm.tok_encode = _memoised_encoder(self.lm.tok_encode)

    def sync(self) -> None:
        """Nothing to do: HFLM runs the live model."""


class VllmBackend:
    """The process's vLLM engine (lm-eval's ``vllm`` model), given the live model's weights before each evaluation.

    The live model (a `transformers` model, written by the merge engine) stays the one source of truth: `sync`
    loads every one of its tensors into the engine, checks that every engine parameter was written, and resets
    the prefix cache. The engine is built once per process and architecture, and reused by every evaluator of that
    process (a search's trials, its baselines, the final scoring).
    """

    name = "vllm"

    def __init__(self, model, tokenizer, options: VllmOptions):
        problem = vllm_problem()
        if problem is not None:
            raise BackendError(f"evaluation.vllm: {problem}")
        self.model = model
        self.options = options
        self.tokenizer_digest = _tokenizer_digest(tokenizer)
        self.device_type = "cuda"
        self.clock = _VLLM_CLOCK  # vLLM returns finished outputs: nothing is left queued to synchronise
        self.lm = _engine_for(self._engine_key(), self._build)
        self.loads = 0  # how many times weights were loaded into the engine (tests, progress)

    def _live_config(self) -> dict[str, Any]:
        return {key: value for key, value in self.model.config.to_dict().items()
                if key not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}

    def _engine_key(self) -> str:
        payload = {"config": self._live_config(), "options": replace(self.options, folder=""),
                   "tokenizer": self.tokenizer_digest}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _build(self):
        """A new engine for the live model's architecture (lm-eval's vllm model, which owns a `vllm.LLM`)."""
        # One engine in this process: its model is reachable from here, so the live tensors are handed over by
        # reference (no serialisation, no copy through host memory).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from lm_eval.models.vllm_causallms import VLLM

        options = self.options
        folder_config = json.loads(Path(options.folder, "config.json").read_text())
        live = self._live_config()
        overrides = {key: live[key] for key in _DEPTH_KEYS if key in live and live[key] != folder_config.get(key)}
        extra: dict[str, Any] = {}
        if overrides:  # another depth than the folder's weights: start from placeholders, replaced by `sync`
            extra = {"hf_overrides": overrides, "load_format": "dummy"}
        lm = VLLM(pretrained=options.folder, dtype=options.dtype, batch_size="auto", seed=options.seed,
                  max_length=options.max_length, trust_remote_code=options.trust_remote_code,
                  enforce_eager=options.enforce_eager, gpu_memory_utilization=options.gpu_memory_utilization,
                  enable_prefix_caching=True, **extra)
        _VLLM_CLOCK.time(lm)
        return lm

    def sync(self) -> None:
        """Load the live model's current weights into the engine (rebuilt first if the depth changed)."""
        self.lm = _engine_for(self._engine_key(), self._build)
        weights = list(self.model.state_dict().items())

        def load(engine_model) -> list[str]:
            loaded = engine_model.load_weights(weights)
            if loaded is None:  # a model whose loader does not report what it wrote
                return []
            expected = {name for name, _ in engine_model.named_parameters()}
            return sorted(expected - set(loaded))

        for missing in self.lm.model.apply_model(load):
            if missing:
                raise BackendError(f"vLLM's model has parameters that the live model's weights do not cover: "
                                   f"{missing[:5]} ({len(missing)} in all); this architecture cannot be evaluated "
                                   "with evaluation.vllm")
        self.lm.model.reset_prefix_cache()
        self.loads += 1


# The process's one vLLM engine: (key, lm-eval model). A new key (another architecture) replaces it. Its forward
# time is counted on one clock, whichever evaluator asked.
_ENGINE: list = []
_VLLM_CLOCK = ForwardClock()


def _engine_for(key: str, build):
    if _ENGINE and _ENGINE[0][0] == key:
        return _ENGINE[0][1]
    if _ENGINE:  # release the old engine's GPU memory before the new one takes its share
        _ENGINE.clear()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lm = build()
    _ENGINE.append((key, lm))
    return lm


def _tokenizer_digest(tokenizer) -> str:
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), getattr(tokenizer, "chat_template", None)],
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _memoised_encoder(encode, max_entries: int = 1 << 16):
    """Tokenise each prompt string once per process: every trial sends the same prompts (only the weights change),
    and tokenising them again is, on small models, a large share of the time outside the forward passes."""
    cached = functools.lru_cache(maxsize=max_entries)(
        lambda string, add_special_tokens, left_truncate_len: tuple(
            encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len)))

    def tok_encode(string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        if kwargs or not isinstance(string, str):
            return encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len, **kwargs)
        return list(cached(string, add_special_tokens, left_truncate_len))  # a fresh list: callers may modify it

    return tok_encode


def make_backend(model, tokenizer, *, batch_size: int | str, max_length: int | None,
                 vllm: VllmOptions | None = None):
    """The backend that evaluates ``model``: vLLM when ``vllm`` options are given, else transformers."""
    if vllm is not None:
        return VllmBackend(model, tokenizer, replace(vllm, max_length=max_length))
    return TransformersBackend(model, tokenizer, batch_size=batch_size, max_length=max_length)
