"""`auto-merge zoo report`: the zoo's quality bar, measured.

Scores the base, each expert and a family of merges (uniform task arithmetic at several λ, TIES, and a seeded random
sample of per-layer-group task-arithmetic coefficients) on the zoo's lm-eval tasks. The bar:
1. each expert scores at least `OWN_SKILL_BAR` on its own task and beats the base and every other expert there by at
   least `EXPERT_MARGIN`;
2. merging pays: the best random per-group merge beats the best expert's mean by at least `MERGE_GAIN_BAR`;
3. a search has something to find: that merge also beats the best uniform task arithmetic (over the λ grid) by at
   least `SEARCH_GAIN_BAR`;
4. depth pays: on the four tasks with the layer expert's new skill (`cap`), a stack of two experts' layers deeper than
   the base (one row expert's layers 0-6, then the layer expert's 6-7, as depth-wise integration stacks them) beats
   the best expert by at least `DEPTH_GAIN_BAR`. The layer expert must reach `OWN_SKILL_BAR` on its own task too.
Merges and stacks go through the merge engine's in-memory path, the same path a search uses.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from auto_merge.zoo.tasks import DEPTH_TASKS, HEADLINE_METRIC, HEADLINE_TASKS

EXPERT_MARGIN = 0.2
OWN_SKILL_BAR = 0.95
MERGE_GAIN_BAR = 0.10
SEARCH_GAIN_BAR = 0.05
DEPTH_GAIN_BAR = 0.05
EXPERTS = ("num", "col", "wrd")
LAYER_EXPERT = "cap"
OWN_TASK = {name: f"zoo_{name}" for name in EXPERTS + (LAYER_EXPERT,)}
# Stacks scored for the depth bar: a row expert's layers [0, cut), then the layer expert's trained layers [a, b)
# (6-7 by the default recipe). A cut of a + 1 is one layer deeper than the base; a cut of a keeps the base's depth
# (shown for comparison, not for the bar).
TA_LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.2)
TIES_SETTINGS = ({"density": 0.5, "lambda": 1.0}, {"density": 0.5, "lambda": 2.0})
N_GROUPS = 4
RANDOM_COEFFICIENT_RANGE = (0.4, 1.6)
RANDOM_SAMPLE_SEED = 99


@dataclass
class Row:
    label: str
    kind: str  # "base", "expert", "layer_expert", "task_arithmetic", "ties", "random_groups", "stack"
    scores: dict[str, float]  # task -> headline metric
    setting: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean over the three row skills (the merge bars)."""
        return statistics.fmean(self.scores[t] for t in HEADLINE_TASKS)

    @property
    def depth_mean(self) -> float:
        """Mean over the four skills, `cap` included (the depth bar)."""
        return statistics.fmean(self.scores[t] for t in DEPTH_TASKS)


@dataclass
class ZooReport:
    seed: int
    rows: list[Row]
    seconds: float

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    @property
    def experts(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "expert"]

    @property
    def merges(self) -> list[Row]:
        return [r for r in self.rows if r.kind in ("task_arithmetic", "ties", "random_groups")]

    @property
    def stacks(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "stack"]

    def expert_margins(self) -> dict[str, float]:
        """Per expert: own-task score minus the best of the base and the other experts on that task."""
        margins = {}
        for name in EXPERTS:
            task = OWN_TASK[name]
            others = [r.scores[task] for r in self.rows if r.kind in ("base", "expert") and r.label != name]
            margins[name] = self.row(name).scores[task] - max(others)
        return margins

    @property
    def best_expert(self) -> Row:
        return max(self.experts, key=lambda r: r.mean)

    @property
    def best_expert_of_four(self) -> Row:
        """The best of every expert, the layer expert included, on the four tasks."""
        return max((r for r in self.rows if r.kind in ("expert", "layer_expert")), key=lambda r: r.depth_mean)

    @property
    def best_deeper_stack(self) -> Row:
        return max((r for r in self.stacks if r.setting["depth"] > r.setting["base_depth"]), key=lambda r: r.depth_mean)

    @property
    def depth_gain(self) -> float:
        """Best stack deeper than the base minus the best expert, mean over the four tasks."""
        return self.best_deeper_stack.depth_mean - self.best_expert_of_four.depth_mean

    @property
    def depth_pays(self) -> bool:
        own = self.row(LAYER_EXPERT).scores[OWN_TASK[LAYER_EXPERT]]
        return own >= OWN_SKILL_BAR and self.depth_gain >= DEPTH_GAIN_BAR - 1e-9

    @property
    def best_merge(self) -> Row:
        return max(self.merges, key=lambda r: r.mean)

    def _best(self, kind: str) -> Row:
        return max((r for r in self.rows if r.kind == kind), key=lambda r: r.mean)

    @property
    def best_random(self) -> Row:
        return self._best("random_groups")

    @property
    def best_uniform_ta(self) -> Row:
        return self._best("task_arithmetic")

    @property
    def merge_gain(self) -> float:
        """Best random per-group merge minus the best expert, mean task score."""
        return self.best_random.mean - self.best_expert.mean

    @property
    def search_gain(self) -> float:
        """Best random per-group merge minus the best uniform task arithmetic."""
        return self.best_random.mean - self.best_uniform_ta.mean

    @property
    def experts_are_specialists(self) -> bool:
        return all(self.row(name).scores[OWN_TASK[name]] >= OWN_SKILL_BAR for name in EXPERTS) and all(
            m >= EXPERT_MARGIN for m in self.expert_margins().values())

    @property
    def merging_pays(self) -> bool:
        return self.merge_gain >= MERGE_GAIN_BAR - 1e-9

    @property
    def search_matters(self) -> bool:
        return self.search_gain >= SEARCH_GAIN_BAR - 1e-9

    @property
    def quality_bar_met(self) -> bool:
        return self.experts_are_specialists and self.merging_pays and self.search_matters and self.depth_pays

    def render(self) -> str:
        columns = list(HEADLINE_TASKS) + ["mean"]
        shown = [r for r in self.rows if r.kind not in ("random_groups", "stack")]
        randoms = [r for r in self.rows if r.kind == "random_groups"]
        if randoms:
            shown.append(max(randoms, key=lambda r: r.mean))
        lines = [f"demo zoo, seed {self.seed}: exact match on the zoo tasks ({self.seconds:.0f} s)", ""]
        width = max(len(r.label) for r in shown) + 2
        lines.append("model".ljust(width) + "".join(c.rjust(10) for c in columns))
        for r in shown:
            values = [r.scores[t] for t in HEADLINE_TASKS] + [r.mean]
            lines.append(r.label.ljust(width) + "".join(f"{v:10.3f}" for v in values))
        if randoms:
            means = sorted(r.mean for r in randoms)
            lines.append(
                f"{len(randoms)} random per-layer-group TA merges: min {means[0]:.3f} / median "
                f"{statistics.median(means):.3f} / max {means[-1]:.3f}"
            )
        margins = self.expert_margins()
        met = {True: "met", False: "NOT met"}
        lines.append("")
        lines.append(
            "experts on their own task: "
            + ", ".join(f"{k} {self.row(k).scores[OWN_TASK[k]]:.3f} ({margins[k]:+.3f} over the others)"
                        for k in EXPERTS)
            + f"  (bar ≥ {OWN_SKILL_BAR:.2f} and {EXPERT_MARGIN:+.2f}: {met[self.experts_are_specialists]})"
        )
        best, expert, uniform = self.best_random, self.best_expert, self.best_uniform_ta
        lines.append(
            f"best random merge {best.label} {best.mean:.3f} vs best expert {expert.label} {expert.mean:.3f}: "
            f"{100 * self.merge_gain:+.1f} points (bar {100 * MERGE_GAIN_BAR:+.0f}: {met[self.merging_pays]})"
        )
        lines.append(
            f"best random merge vs best uniform task arithmetic {uniform.label} {uniform.mean:.3f}: "
            f"{100 * self.search_gain:+.1f} points (bar {100 * SEARCH_GAIN_BAR:+.0f}: {met[self.search_matters]})"
        )
        lines += ["", f"depth: the four tasks with the layer expert's new skill ({', '.join(DEPTH_TASKS)})"]
        depth_rows = [r for r in self.rows if r.kind in ("base", "expert", "layer_expert")] + self.stacks
        width = max(len(r.label) for r in depth_rows) + 2
        lines.append("model".ljust(width) + "".join(c.rjust(10) for c in list(DEPTH_TASKS) + ["mean", "depth"]))
        base_depth = self.row(LAYER_EXPERT).setting["base_depth"]
        for r in depth_rows:
            values = "".join(f"{r.scores[t]:10.3f}" for t in DEPTH_TASKS) + f"{r.depth_mean:10.3f}"
            lines.append(r.label.ljust(width) + values + str(r.setting.get("depth", base_depth)).rjust(10))
        stack, expert = self.best_deeper_stack, self.best_expert_of_four
        own = self.row(LAYER_EXPERT).scores[OWN_TASK[LAYER_EXPERT]]
        lines.append(
            f"best stack deeper than the base {stack.label} {stack.depth_mean:.3f} vs best expert {expert.label} "
            f"{expert.depth_mean:.3f}: {100 * self.depth_gain:+.1f} points; {LAYER_EXPERT} on its own task "
            f"{own:.3f} (bar {100 * DEPTH_GAIN_BAR:+.0f} and ≥ {OWN_SKILL_BAR:.2f}: {met[self.depth_pays]})"
        )
        lines.append(f"quality bar: {met[self.quality_bar_met]}")
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        payload = {
            "seed": self.seed,
            "seconds": self.seconds,
            "rows": [asdict(r) | {"mean": r.mean, "depth_mean": r.depth_mean} for r in self.rows],
            "expert_margins": self.expert_margins(),
            "merge_gain": self.merge_gain,
            "search_gain": self.search_gain,
            "depth_gain": self.depth_gain,
            "best_deeper_stack": self.best_deeper_stack.label,
            "quality_bar_met": self.quality_bar_met,
        }
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def group_of(tensor_name: str, n_layers: int, n_groups: int = N_GROUPS) -> int:
    """Layer group of a tensor: embeddings join the first group, the final norm and head the last."""
    from auto_merge.merge.live import layer_index

    layer = layer_index(tensor_name)
    if layer is not None:
        return layer * n_groups // n_layers
    return 0 if "embed" in tensor_name else n_groups - 1


def random_group_settings(samples: int, n_groups: int = N_GROUPS, n_experts: int = len(EXPERTS)):
    """The same seeded sample for every zoo: coefficient per (group, expert)."""
    rng = random.Random(RANDOM_SAMPLE_SEED)
    low, high = RANDOM_COEFFICIENT_RANGE
    return [[[rng.uniform(low, high) for _ in range(n_experts)] for _ in range(n_groups)] for _ in range(samples)]


def run_report(seed: int = 0, samples: int = 30, progress: bool = False, cache_dir=None,
               root: Path | None = None) -> ZooReport:
    """Score the zoo of ``seed`` (shipped for seed 0, else built in the cache), or the zoo folder ``root``."""
    from tqdm.auto import tqdm

    from auto_merge.evaluation.lm_eval_runner import LiveEvaluator, TaskSuite, load_checkpoint
    from auto_merge.merge.live import ResidentSources, TensorSpec, materialise_into
    from auto_merge.zoo.locate import zoo_root

    started = time.perf_counter()
    if root is None:
        root = zoo_root(seed=seed, cache_dir=cache_dir)
    elif not (Path(root) / "base" / "config.json").is_file():
        raise FileNotFoundError(f"{root} is not a zoo folder (no base/config.json); see `auto-merge zoo build`")
    root = Path(root)
    if not (root / LAYER_EXPERT / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no {LAYER_EXPERT}/ model (a zoo built before the layer expert); "
                                f"rebuild it with `auto-merge zoo build --overwrite`")
    suite = TaskSuite(list(DEPTH_TASKS), include_paths=[root / "tasks"])
    model, tokenizer = load_checkpoint(root / "base")
    n_layers = model.config.num_hidden_layers
    evaluator = LiveEvaluator(model, tokenizer, suite, batch_size=128)
    sources = ResidentSources.from_checkpoints(root / "base", [root / name for name in EXPERTS])

    def score() -> dict[str, float]:
        results = evaluator.evaluate()
        return {task: results[task][HEADLINE_METRIC] for task in DEPTH_TASKS}

    def uniform(spec: TensorSpec):
        return lambda name: spec

    candidates: list[tuple[str, str, dict, object]] = [("base", "base", {}, None)]
    for i, name in enumerate(EXPERTS):
        one_hot = tuple({"weight": 1.0 if j == i else 0.0} for j in range(len(EXPERTS)))
        candidates.append((name, "expert", {}, uniform(TensorSpec("linear", {}, one_hot))))
    for lam in TA_LAMBDAS:
        weights = tuple({"weight": 1.0} for _ in EXPERTS)
        candidates.append((f"TA λ={lam}", "task_arithmetic", {"lambda": lam},
                           uniform(TensorSpec("task_arithmetic", {"lambda": lam}, weights))))
    for setting in TIES_SETTINGS:
        ties_models = tuple({"weight": 1.0, "density": setting["density"]} for _ in EXPERTS)
        candidates.append((f"TIES d={setting['density']} λ={setting['lambda']}", "ties", dict(setting),
                           uniform(TensorSpec("ties", {"lambda": setting["lambda"]}, ties_models))))
    for k, coefficients in enumerate(random_group_settings(samples)):
        specs = [TensorSpec("task_arithmetic", {"lambda": 1.0}, tuple({"weight": c} for c in group))
                 for group in coefficients]
        candidates.append((f"random groups #{k}", "random_groups", {"coefficients": coefficients},
                           lambda name, specs=specs: specs[group_of(name, n_layers)]))

    rows = []
    for label, kind, setting, plan in tqdm(candidates, desc="zoo report", disable=not progress, dynamic_ncols=True):
        if plan is None:
            _restore_base(model, sources)
        else:
            materialise_into(model, sources, plan, seed=seed)
        rows.append(Row(label, kind, score(), setting))
    rows += _score_layer_expert_and_stacks(root, model, score, progress)
    return ZooReport(seed=seed, rows=rows, seconds=time.perf_counter() - started)


def stack_recipe(root: Path, plan: list[tuple[str, int, int]]) -> dict:
    """A passthrough recipe stacking zoo models' layer ranges: ``plan`` lists (model, first layer, end layer),
    input side first; embeddings come from the first model, the final norm and head from the last (as DIS stacks)."""
    slices = [{"merge_method": "passthrough", "sources": [{"model": str(root / name), "layer_range": [start, end]}]}
              for name, start, end in plan]
    return {"base_model": str(root / "base"), "dtype": "float32", "slices": slices}


def _score_layer_expert_and_stacks(root: Path, model, score, progress: bool) -> list[Row]:
    """The layer expert alone, and each row expert's first layers stacked under its late layers, written into the
    report's live model (its depth follows each stack) and scored by the same evaluator."""
    from tqdm.auto import tqdm

    from auto_merge.merge.live import LiveMerger

    n_layers = model.config.num_hidden_layers
    merger = LiveMerger(model, device="cpu", models=[str(root / name) for name in ("base",) + EXPERTS
                                                     + (LAYER_EXPERT,)])
    start, end = _trained_layers(root)
    plans = [(LAYER_EXPERT, "layer_expert", [(LAYER_EXPERT, 0, n_layers)])]
    plans += [(f"{name}[0:{cut}] + {LAYER_EXPERT}[{start}:{end}]", "stack",
               [(name, 0, cut), (LAYER_EXPERT, start, end)]) for cut in (start + 1, start) for name in EXPERTS]
    rows = []
    for label, kind, plan in tqdm(plans, desc="zoo report: stacks", disable=not progress, dynamic_ncols=True):
        merger.apply(stack_recipe(root, plan))
        depth = sum(end - begin for _, begin, end in plan)
        setting = {"plan": [list(p) for p in plan], "depth": depth, "base_depth": n_layers}
        rows.append(Row(label, kind, score(), setting))
    return rows


def _trained_layers(root: Path) -> tuple[int, int]:
    """[first, end) of the layers the zoo's layer expert trained, from its manifest's recipe."""
    from auto_merge.zoo.build import MANIFEST
    from auto_merge.zoo.train import DEFAULT_RECIPE

    manifest = root / MANIFEST
    recipe = json.loads(manifest.read_text()).get("recipe", {}) if manifest.is_file() else {}
    layers = recipe.get("layer_expert", {}).get("layers", DEFAULT_RECIPE.layer_expert.layers)
    return min(layers), max(layers) + 1


def _restore_base(model, sources) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sources.names:
            params[name].copy_(sources.base[name])
