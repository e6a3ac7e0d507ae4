"""A FREE-Merging folder in use: its manifest, and one task's full model written out from the backbone plus that
task's sparse expert (:func:`materialise`). Building the folder is :func:`auto_merge.merge.free.build_free`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_merge.merge.free import (
    BACKBONE_DIR,
    COMBINES,
    FREE_FILE,
    FREE_FORMAT,
    FREE_VERSION,
    FreeError,
    apply_expert,
    read_expert,
)


def is_free_folder(path: str | Path) -> bool:
    return (Path(path) / FREE_FILE).is_file()


@dataclass(frozen=True)
class FreeFolder:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "FreeFolder":
        path = Path(path)
        manifest_path = path / FREE_FILE
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise FreeError(f"{manifest_path}: not a readable FREE manifest ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FREE_FORMAT:
            raise FreeError(f"{manifest_path}: not a FREE-Merging folder (format is not {FREE_FORMAT!r})")
        if manifest.get("version") != FREE_VERSION:
            raise FreeError(f"{manifest_path}: format version {manifest.get('version')!r}; this auto-merge reads "
                            f"version {FREE_VERSION}")
        if manifest.get("combine") not in COMBINES or not isinstance(manifest.get("tasks"), dict):
            raise FreeError(f"{manifest_path}: damaged manifest (combine or tasks)")
        folder = cls(path, manifest)
        if not (folder.backbone / "config.json").is_file():
            raise FreeError(f"{path}: the backbone folder {folder.backbone} is missing or not a model folder")
        return folder

    @property
    def backbone(self) -> Path:
        return self.path / self.manifest.get("backbone", {}).get("folder", BACKBONE_DIR)

    @property
    def combine(self) -> str:
        return self.manifest["combine"]

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def expert_file(self, task: str) -> Path | None:
        entry = self.manifest["tasks"].get(task)
        if entry is None:
            return None
        file = self.path / entry["file"]
        if not file.is_file():
            raise FreeError(f"{self.path}: the expert of task {task} ({entry['file']}) is missing")
        return file

    def expert(self, task: str) -> dict[str, tuple[Any, Any]]:
        file = self.expert_file(task)
        return {} if file is None else read_expert(file)[0]

    # -------------------------------------------------------------------------------------- materialise
    def materialise(self, task: str, model_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write the full model of ``task`` (backbone + its expert) as a checkpoint folder with the backbone's
        sharding, config and tokenizer."""
        from safetensors.torch import load_file, save_file

        from auto_merge.output_dirs import OWNER_MARKER, atomic_folder

        if task not in self.manifest["tasks"]:
            raise FreeError(f"{self.path}: no expert for task {task!r}; its tasks: {', '.join(self.tasks)}")
        expert = self.expert(task)
        shards = sorted(self.backbone.glob("*.safetensors"))
        if not shards:
            raise FreeError(f"{self.backbone}: no safetensors files")
        model_dir = Path(model_dir)
        applied: set[str] = set()
        with atomic_folder(model_dir, overwrite=overwrite, protected=[self.path], kind="free-task-model") as staging:
            for item in sorted(self.backbone.iterdir()):
                if item.name == OWNER_MARKER or item.suffix == ".safetensors":
                    continue
                if item.is_dir():
                    shutil.copytree(item, staging / item.name)
                else:
                    shutil.copy2(item, staging / item.name)
            for shard in shards:
                tensors = load_file(str(shard))
                for name, (indices, values) in expert.items():
                    if name in tensors:
                        tensors[name] = apply_expert(tensors[name], indices, values, self.combine)
                        applied.add(name)
                save_file(tensors, str(staging / shard.name), metadata={"format": "pt"})
            missing = sorted(set(expert) - applied)
            if missing:
                raise FreeError(f"{self.path}: the expert of {task} names tensors the backbone lacks: "
                                f"{', '.join(missing[:5])}")
            card = staging / "README.md"
            text = card.read_text(encoding="utf-8") if card.is_file() else ""
            text += (f"\n## FREE-Merging task model\n\nThis is the model of task `{task}` of the FREE-Merging folder "
                     f"{self.path}: its backbone with the expert `{self.manifest['tasks'][task]['file']}` applied "
                     f"(combine: {self.combine}). The recipe above remakes the backbone only; `auto-merge free "
                     f"materialise FREE_DIR {task} MODEL_DIR` remakes this model.\n")
            card.write_text(text, encoding="utf-8")
        return model_dir

    # ---------------------------------------------------------------------------------------- evaluate
    def routes(self, tasks: Sequence[str]) -> dict[str | None, list[str]]:
        """Expert task (None: the backbone alone) → the requested tasks scored with it, in request order."""
        routes: dict[str | None, list[str]] = {}
        for task in tasks:
            routes.setdefault(task if task in self.manifest["tasks"] else None, []).append(task)
        return routes

    def evaluate(self, tasks: Sequence[str], *, limit=None, batch_size: int = 64, device: str = "cpu",
                 include_paths=None, dtype: str = "float32", allow_code_execution: bool = False,
                 allow_pickle: bool = False, trust_remote_code: bool = False, chat=None,
                 samples: list | None = None) -> dict[str, dict[str, float]]:
        """Score each task with its own model: the backbone is loaded once; for each task with an expert the expert
        is applied in place (as :meth:`materialise` computes it, from the backbone's stored values), the task is
        scored, and the touched entries are restored. Tasks without an expert are scored with the backbone."""
        import torch

        from auto_merge.evaluation.lm_eval_runner import (
            LiveEvaluator,
            TaskSuite,
            load_checkpoint,
            resolve_device,
        )
        from auto_merge.merge.io import CheckpointReader

        model, tokenizer = load_checkpoint(self.backbone, dtype=dtype, device=resolve_device(device),
                                           allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        state = model.state_dict()
        results: dict[str, dict[str, float]] = {}
        with CheckpointReader(self.backbone) as backbone:
            for route, route_tasks in self.routes(tasks).items():
                suite = TaskSuite(route_tasks, include_paths, allow_code_execution=allow_code_execution)
                saved = []
                try:
                    with torch.no_grad():
                        for name, (indices, values) in (self.expert(route) if route else {}).items():
                            if name not in state:
                                raise FreeError(f"{self.path}: the expert of {route} names tensor {name}, which "
                                                f"the loaded model does not have")
                            param = state[name]
                            flat = param.view(-1)
                            stored = backbone.get_tensor(name)
                            new = apply_expert(stored, indices, values, self.combine).reshape(-1)[indices]
                            saved.append((flat, indices.to(flat.device), flat[indices.to(flat.device)].clone()))
                            flat[indices.to(flat.device)] = new.to(device=flat.device, dtype=flat.dtype)
                    evaluator = LiveEvaluator(model, tokenizer, suite, batch_size=batch_size, chat=chat)
                    results.update(evaluator.evaluate(limit=limit, samples=samples))
                finally:
                    with torch.no_grad():
                        for flat, indices, original in saved:
                            flat[indices] = original
        return results


def materialise(folder: str | Path, task: str, model_dir: str | Path, *, overwrite: bool = False) -> Path:
    """`auto-merge free materialise FREE_DIR TASK MODEL_DIR`."""
    return FreeFolder.open(folder).materialise(task, model_dir, overwrite=overwrite)
