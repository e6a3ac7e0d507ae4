"""Cross-checks between a config and its models, from `config.json` and safetensors headers only (no weights).

Only the selected strategy's models are resolved. Architecture rule: every model must match the base model in
`model_type`, `architectures`, hidden size, attention heads, key/value heads, head size and intermediate size.
`vocab_size` may differ (added tokens are aligned at merge time), and so may everything else
(rope settings, dtype, ...). Depth rules depend on the strategy: lfs, lfs_multiobj and normal_models need equal
depths, dis and prune need `num_hidden_layers` to be the real depth, normal_slices needs each layer range to fit.
Each strategy's registration says which of the checker's checks its block gets (``check_models``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from auto_merge.config.errors import ConfigError, ConfigProblem, KeyPath, SourceMap
from auto_merge.config.schema import ExperimentConfig
from auto_merge.models.inspect import (
    ModelInfo,
    ModelInspectionError,
    architecture_differences,
    architecture_signature,
    inspect_model,
)
from auto_merge.models.resolve import ModelResolutionError, resolve_model_ref

def _is_vocabulary_tensor(name: str) -> bool:
    return "embed" in name or "lm_head" in name or name.endswith("wte.weight")


def _describe_signature(signature: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in signature.items() if value is not None)


class _ModelChecker:
    def __init__(self, config: ExperimentConfig, aliases: Mapping[str, str], build_zoo: bool):
        self.config = config
        self.params = config.global_params
        self.aliases = aliases
        self.build_zoo = build_zoo
        self.sources = config.sources or SourceMap(root_file=Path("<config>"))
        self.search_dirs = [config.source_file.parent] if config.source_file is not None else []
        self.prefix: KeyPath = ("strategies", config.strategy)
        self.problems: list[ConfigProblem] = []
        self.infos: dict[str, ModelInfo] = {}
        self.failed: set[str] = set()

    def problem(self, subpath: KeyPath, message: str, allowed: str | None) -> None:
        path = self.prefix + subpath
        self.problems.append(ConfigProblem(self.sources.locate(path), path, message, allowed))

    def model(self, subpath: KeyPath, reference: str) -> ModelInfo | None:
        """Resolve and inspect `reference` (once per reference); report a problem at `subpath` on failure."""
        if reference in self.infos:
            return self.infos[reference]
        if reference in self.failed:
            return None
        try:
            path = resolve_model_ref(reference, aliases=self.aliases, zoo_seed=self.params.zoo_seed,
                                     cache_dir=self.params.cache_dir, build_zoo=self.build_zoo,
                                     search_dirs=self.search_dirs)
            info = inspect_model(reference, path, allow_pickle=self.params.allow_pickle)
        except ModelResolutionError as error:
            known = ", ".join(sorted(self.aliases)) or "none"
            self.problem(subpath, str(error), "a local model folder, a .gguf file, zoo:NAME, a hub id in the local Hugging Face "
                                              f"cache, or a key of global_params.model_aliases (defined: {known})")
            self.failed.add(reference)
            return None
        except ModelInspectionError as error:
            self.problem(subpath, str(error), "a model folder with config.json and safetensors weights")
            self.failed.add(reference)
            return None
        if info.config.get("auto_map") and not self.params.trust_remote_code:
            self.problem(subpath, f"model {reference!r} needs custom code from its folder to load (config.json has "
                                  f"auto_map: {sorted(info.config['auto_map'])})",
                         "global_params.trust_remote_code: true (runs that folder's Python code), or a model of "
                         "an architecture transformers knows")
        self.infos[reference] = info
        return info

    def same_architecture(self, subpath: KeyPath, model: ModelInfo | None, base: ModelInfo | None) -> None:
        if model is None or base is None or model.reference == base.reference:
            return
        expected = architecture_signature(base.config)
        differences = architecture_differences(model.config, base.config)
        if differences:
            self.problem(subpath, f"model {model.reference!r} does not share the base model's architecture: "
                                  f"{'; '.join(differences)}",
                         f"models with the architecture of base model {base.reference!r} "
                         f"({_describe_signature(expected)}); vocab_size may differ")
        elif model.depth == base.depth and model.shapes and base.shapes:
            self.same_tensors(subpath, model, base)

    def same_tensors(self, subpath: KeyPath, model: ModelInfo, base: ModelInfo) -> None:
        """An identical config.json can still hide a missing tensor or one of another shape (headers tell)."""
        missing = sorted(set(base.shapes) - set(model.shapes))
        extra = sorted(set(model.shapes) - set(base.shapes))
        reshaped = sorted(name for name in set(base.shapes) & set(model.shapes)
                          if model.shapes[name] != base.shapes[name]
                          and not (_is_vocabulary_tensor(name) and model.shapes[name][1:] == base.shapes[name][1:]))
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensor(s) of the base, e.g. {missing[0]}")
        if extra:
            details.append(f"{len(extra)} tensor(s) the base lacks, e.g. {extra[0]}")
        if reshaped:
            name = reshaped[0]
            details.append(f"{len(reshaped)} tensor(s) of another shape, e.g. {name} {list(model.shapes[name])} "
                           f"(base: {list(base.shapes[name])})")
        if details:
            self.problem(subpath, f"model {model.reference!r} does not have the base model's tensors: "
                                  f"{'; '.join(details)}",
                         f"models with the tensor names and shapes of base model {base.reference!r} (the "
                         f"vocabulary dimension of embeddings and head may differ)")

    def depth_of(self, subpath: KeyPath, model: ModelInfo | None) -> int | None:
        if model is None:
            return None
        if model.depth is None:
            self.problem(subpath, f"config.json of {model.reference!r} has no integer num_hidden_layers",
                         "a decoder model config with num_hidden_layers")
        return model.depth

    # -- per strategy ------------------------------------------------------------------------------------------

    def check_experts(self, block) -> tuple[ModelInfo | None, list]:
        base = self.model(("base_model",), block.base_model)
        experts = []
        for index, reference in enumerate(block.models):
            expert = self.model(("models", index), reference)
            self.same_architecture(("models", index), expert, base)
            experts.append((("models", index), expert))
        return base, experts

    def check_models_exist(self, block) -> None:
        """The generic check of a strategy with none of its own: `base_model` and every entry of `models` exist
        and share the base's architecture."""
        self.check_experts(block)

    def check_lfs(self, block) -> None:
        base, experts = self.check_experts(block)
        depth = self.depth_of(("base_model",), base)
        if depth is None:
            return
        for subpath, expert in experts:
            expert_depth = self.depth_of(subpath, expert)
            if expert_depth is not None and expert_depth != depth:
                self.problem(subpath, f"model {expert.reference!r} has {expert_depth} layers, the base model {depth}",
                             f"a model with {depth} layers, like the base model")
        if depth % block.layer_granularity:
            divisors = [str(size) for size in range(1, depth + 1) if depth % size == 0]
            self.problem(("layer_granularity",), f"{block.layer_granularity} does not divide the base model's "
                                                 f"{depth} layers", f"a divisor of {depth}: {', '.join(divisors)}")
        for index, name in enumerate(block.filters):
            if not any(name in tensor for tensor in base.tensor_names):
                self.problem(("filters", index), f"filter {name!r} matches no tensor name of the base model "
                                                 f"{base.reference!r}",
                             f"a substring of its tensor names, e.g. {_name_fragments(base.tensor_names)}")

    def check_fixed_depth(self, block) -> None:
        base, experts = self.check_experts(block)
        for subpath, model in [(("base_model",), base)] + experts:
            depth = self.depth_of(subpath, model)
            if depth is not None and depth != block.num_hidden_layers:
                self.problem(("num_hidden_layers",), f"{block.num_hidden_layers} differs from the depth of "
                                                     f"{model.reference!r} ({depth} layers)",
                             f"the models' real depth: {depth}")
                break  # one report is enough: the user fixes the number once
        if base is not None and not any(block.scale_filter in tensor for tensor in base.tensor_names):
            self.problem(("scale_filter",), f"{block.scale_filter!r} matches no tensor name of the base model "
                                            f"{base.reference!r}",
                         f"the name of each layer's MLP output projection, e.g. a substring among "
                         f"{_name_fragments(base.tensor_names)}")

    def check_normal_models(self, block) -> None:
        base = self.model(("base_model",), block.base_model)
        depth = self.depth_of(("base_model",), base)
        for index, entry in enumerate(block.models):
            subpath = ("models", index, "model")
            model = self.model(subpath, entry.model)
            self.same_architecture(subpath, model, base)
            model_depth = self.depth_of(subpath, model)
            if depth is not None and model_depth is not None and model_depth != depth:
                self.problem(subpath, f"model {entry.model!r} has {model_depth} layers, the base model {depth}",
                             f"a model with {depth} layers (use normal_slices to combine different depths)")

    def check_normal_slices(self, block) -> None:
        base = self.model(("base_model",), block.base_model)
        self.depth_of(("base_model",), base)
        for slice_index, piece in enumerate(block.slices):
            spans = [(("slices", slice_index, "sources", index), source) for index, source in enumerate(piece.sources)]
            if piece.target is not None:
                spans.append((("slices", slice_index, "target"), piece.target))
            for subpath, span in spans:
                model = self.model(subpath + ("model",), span.model)
                self.same_architecture(subpath + ("model",), model, base)
                depth = self.depth_of(subpath + ("model",), model)
                if depth is not None and span.layer_range[1] > depth:
                    start, end = span.layer_range
                    self.problem(subpath + ("layer_range",), f"[{start}, {end}) goes beyond the {depth} layers of "
                                                             f"{span.model!r}",
                                 f"[a, b] with 0 <= a < b <= {depth}")


def _name_fragments(tensor_names: list[str], limit: int = 12) -> str:
    """Distinct dotted components of the tensor names, without numbers: what a filter can usefully match."""
    fragments: list[str] = []
    for name in tensor_names:
        for part in name.split("."):
            if not part.isdigit() and part not in fragments and part not in ("weight", "bias"):
                fragments.append(part)
    shown = fragments[:limit]
    return ", ".join(shown) + (", ..." if len(fragments) > limit else "")


def check_experiment_models(
    config: ExperimentConfig,
    *,
    extra_aliases: Mapping[str, str] | None = None,
    build_zoo: bool = True,
) -> dict[str, ModelInfo]:
    """Resolve the selected strategy's models and check them against the config (headers only, no weights).

    `extra_aliases` are added to `global_params.model_aliases` (and win). Returns reference → ModelInfo and records
    the folders in `config.model_paths`. Raises ConfigError listing every problem found."""
    aliases = {**config.global_params.model_aliases, **(extra_aliases or {})}
    from auto_merge.strategies.registry import get_strategy

    checker = _ModelChecker(config, aliases, build_zoo)
    block = config.selected
    entry = get_strategy(config.strategy)
    if entry.check_models is not None:
        entry.check_models(checker, block)
    else:
        checker.check_models_exist(block)
    if checker.problems:
        raise ConfigError(checker.problems, config_file=config.source_file)
    config._model_paths = {reference: info.path for reference, info in checker.infos.items()}
    return checker.infos
