"""Depth strategies: DIS layer lists (granularity, repeat, fix_layers, remain_base), pruning decode and its base-index
rule, the compact removal encoding, scale folding, the live model changing depth, reference imports, and both
searches end to end on the demo zoo."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from auto_merge.strategies import StrategyError, strategy_from_description
from auto_merge.strategies.depth import RejectedConfiguration
from auto_merge.strategies.dis import DISStrategy, count_orderings, distinct_orderings
from auto_merge.strategies.prune import PruneStrategy, removal_heuristics

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
REFERENCE_SEARCH = REPO / "tests" / "data" / "reference" / "search_config"
REFERENCE_MODELS = ("WizardLMTeam/WizardLM-13B-V1.2", "vanillaOVO/WizardMath-13B-V1.0",
                    "layoric/llama-2-13b-code-alpaca")
PROMPTS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 20, 21, 22, 23, 24]])


def dis(**settings) -> DISStrategy:
    defaults = dict(base_model="B", models=("X", "Y"), num_layers=8, max_layers=50)
    return DISStrategy(**{**defaults, **settings})


def selection(strategy: DISStrategy, chosen: dict[int, list[int]], scales: dict[int, float] | None = None,
              orderings: dict[int, int] | None = None) -> dict:
    """Values selecting blocks `chosen[position]` (others off), with scales and ordering indices."""
    values = dict(strategy.build_space().get_default_configuration())
    for i, blocks in chosen.items():
        for j in blocks:
            values[f"layer_{i}_block_{j}_selection"] = "1"
    for i, scale in (scales or {}).items():
        values[f"scale_{i}"] = scale
    for i, index in (orderings or {}).items():
        values[f"layer_{i}_permutation_selection"] = str(index)
    return values


# ------------------------------------------------------------------------------------------------------------ DIS

def test_orderings_are_the_distinct_ones_in_lexicographic_order():
    assert distinct_orderings([0, 1, 2]) == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    assert distinct_orderings([0, 1, 0, 1]) == [(0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 1, 0), (1, 0, 0, 1),
                                                (1, 0, 1, 0), (1, 1, 0, 0)]
    assert len(distinct_orderings([0, 1, 2] * 2)) == count_orderings(3, 2) == 90
    assert distinct_orderings([0]) == [(0,)]


def test_dis_granularity_takes_whole_groups_of_the_position():
    strategy = dis(layer_granularity=2)
    values = selection(strategy, {1: [1], 2: [0, 1]}, scales={2: 0.5}, orderings={2: 1})  # ordering 1 = (1, 0)
    assert strategy.layer_plan(values) == [
        ("B", 0, 1.0), ("B", 1, 1.0),
        ("Y", 2, 1.0), ("Y", 3, 1.0),
        ("Y", 4, 1.0), ("Y", 5, 1.0), ("X", 4, 0.5), ("X", 5, 0.5),  # Y first, the last block carries the scale
        ("B", 6, 1.0), ("B", 7, 1.0),
    ]


def test_dis_repeat_stacks_an_experts_layer_more_than_once():
    strategy = dis(num_layers=4, repeat=2)  # candidates: X, Y, X (copy 2), Y (copy 2)
    assert len(strategy.orderings) == 6 and strategy.n_candidates == 4
    # ordering 1 = (X, Y, X, Y): the walk meets block 0 (X), 1 (Y), 2 (X again), 3 (Y again)
    values = selection(strategy, {1: [0, 1, 2]}, scales={1: 1.5}, orderings={1: 1})
    assert strategy.position_blocks(values, 1) == [0, 1, 0]
    assert strategy.layer_plan(values) == [("B", 0, 1.0), ("X", 1, 1.0), ("Y", 1, 1.0), ("X", 1, 1.5),
                                           ("B", 2, 1.0), ("B", 3, 1.0)]
    # ordering 5 = (Y, Y, X, X): block 3 (Y's copy) comes second
    values = selection(strategy, {0: [1, 3, 0]}, orderings={0: 5})
    assert strategy.position_blocks(values, 0) == [1, 1, 0]


def test_dis_fix_layers_are_the_bases_and_remain_base_false_drops_empty_positions():
    strategy = dis(fix_layers=1, remain_base=False)
    assert strategy.n_positions == 6  # layers 1..6
    values = selection(strategy, {0: [0], 5: [1]})
    assert strategy.layer_plan(values) == [("B", 0, 1.0), ("X", 1, 1.0), ("Y", 6, 1.0), ("B", 7, 1.0)]
    kept = dis(fix_layers=1)
    assert [layer for _, layer, _ in kept.layer_plan(values)] == list(range(8))


def test_dis_rejects_too_deep_or_empty_configurations_before_merging():
    strategy = dis(max_layers=9)
    values = selection(strategy, {0: [0, 1], 1: [0, 1]})  # 10 layers
    with pytest.raises(RejectedConfiguration, match="depth 10 exceeds the maximum output depth 9"):
        strategy.decode(values)
    with pytest.raises(RejectedConfiguration, match="depth 0"):
        dis(remain_base=False).decode(selection(dis(remain_base=False), {}))


def test_dis_decode_folds_the_scale_into_the_mlp_output_projection():
    strategy = dis()
    recipe = strategy.decode(selection(strategy, {3: [0, 1]}, scales={3: 0.75}))
    assert recipe["slices"][0] == {"merge_method": "passthrough",
                                   "sources": [{"model": "B", "layer_range": [0, 3]}]}  # unscaled runs merge
    assert recipe["slices"][1]["sources"] == [{"model": "X", "layer_range": [3, 4]}]
    assert "parameters" not in recipe["slices"][1]
    assert recipe["slices"][2]["parameters"] == {"output_scale": [{"filter": "mlp.down_proj", "value": 0.75},
                                                                  {"value": 1.0}]}


def test_dis_initial_design_has_each_expert_alone_and_the_base():
    strategy = dis(models=("X", "Y", "Z"))
    designs = strategy.initial_configurations(strategy.build_space())
    plans = [strategy.layer_plan(dict(c)) for c in designs]
    for model, plan in zip(("X", "Y", "Z", "B"), plans):
        assert plan == [(model, layer, 1.0) for layer in range(8)]


def test_dis_settings_are_checked():
    with pytest.raises(StrategyError, match="does not divide"):
        dis(layer_granularity=3)
    with pytest.raises(StrategyError, match="orderings"):
        dis(models=tuple("ABCDEF"), repeat=2)
    strategy = dis(layer_granularity=3, repeat=2, fix_layers=1, max_layers=20)
    assert strategy_from_description(strategy.describe()) == strategy


def test_reference_dis_configuration_imports_to_the_golden_layer_list():
    strategy = DISStrategy(base_model="meta-llama/Llama-2-13b-hf", models=REFERENCE_MODELS, num_layers=40,
                           max_layers=50)
    flat = json.loads((REFERENCE_SEARCH / "dis" / "single-obj" / "lm-dis0.json").read_text())
    values = strategy.import_reference(flat)
    plan = strategy.layer_plan(values)
    assert len(plan) == 47
    assert [entry for entry in plan if entry[1] == 29] == [
        ("WizardLMTeam/WizardLM-13B-V1.2", 29, 1.0),
        ("layoric/llama-2-13b-code-alpaca", 29, pytest.approx(0.8745, abs=1e-4))]
    assert [i for i in range(40) if not strategy.position_blocks(values, i)] == [20, 23, 25, 26, 30, 36]
    slices = strategy.decode(values)["slices"]
    assert sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices) == 47


def test_dis_as_reference_scales_base_fallbacks_and_takes_the_fixed_layers_from_the_first_expert():
    strategy = dis(fix_layers=1)  # positions 0..5 cover source layers 1..6
    values = selection(strategy, {0: [0]}, scales={0: 0.5, 1: 0.8})  # position 1 selects nothing: base fallback
    assert strategy.layer_plan(values)[:3] == [("B", 0, 1.0), ("X", 1, 0.5), ("B", 2, 1.0)]
    assert strategy.layer_plan(values, as_reference=True)[:3] == [("X", 0, 1.0), ("X", 1, 0.5), ("B", 2, 0.8)]
    assert strategy.layer_plan(values, as_reference=True)[-1] == ("X", 7, 1.0)
    notes = strategy.reference_departures(values)
    assert len(notes) == 2 and "position(s) (1)" in notes[0] and "models[0]" in notes[1]
    assert strategy.reference_departures(values, as_reference=True) == []
    fallback = strategy.decode(values, as_reference=True)["slices"][2]
    assert fallback["sources"][0] == {"model": "B", "layer_range": [2, 3]} and "parameters" in fallback


def test_reference_dis_golden_file_departs_only_where_it_falls_back_with_a_scale():
    strategy = DISStrategy(base_model="meta-llama/Llama-2-13b-hf", models=REFERENCE_MODELS, num_layers=40,
                           max_layers=50)
    values = strategy.import_reference(
        json.loads((REFERENCE_SEARCH / "dis" / "single-obj" / "lm-dis0.json").read_text()))
    scaled_fallbacks = [i for i in (20, 23, 25, 26, 30, 36) if values[f"scale_{i}"] != 1.0]
    notes = strategy.reference_departures(values)
    assert len(notes) == (1 if scaled_fallbacks else 0)
    if scaled_fallbacks:
        assert f"{len(scaled_fallbacks)} position(s)" in notes[0]


def test_prune_as_reference_drops_output_scales_and_reads_moved_merges_against_the_new_position():
    strategy = prune()
    values = dict(strategy.build_space().get_default_configuration())
    values.update(strategy.removal_values([1, 2]))
    for layer in (3, 4, 5, 6, 7, 0):
        for c in range(3):
            values[f"layer_{layer}_candidate_{c}"] = 0
        values[f"layer_{layer}_output_scale"] = 1.0
    values.update({"layer_3_candidate_0": 1, "layer_3_candidate_1": 1, "layer_4_output_scale": 1.5})
    ours, theirs = strategy.decode(values), strategy.decode(values, as_reference=True)
    assert ours["slices"][1]["base_layer_range"] == [3, 4]  # layer 3 is output position 1
    assert theirs["slices"][1]["base_layer_range"] == [1, 2]
    assert "parameters" in ours["slices"][2] and "parameters" not in theirs["slices"][2]
    notes = strategy.reference_departures(values)
    assert len(notes) == 2 and "layers 4" in notes[0] and "layers 3" in notes[1]


def test_reference_dis_file_of_another_space_gets_a_clear_error():
    strategy = DISStrategy(base_model="meta-llama/Llama-2-13b-hf", models=REFERENCE_MODELS, num_layers=40,
                           max_layers=50)
    flat = json.loads((REFERENCE_SEARCH / "dis" / "single-obj" / "lm-dis1.json").read_text())
    with pytest.raises(StrategyError, match=r"does not fit the DIS space of 3 experts.*missing 80 key\(s\).*"
                                            r"layer_0_block_2_selection.*layer_0_permutation_selection"):
        strategy.import_reference(flat)


# ---------------------------------------------------------------------------------------------------------- prune

def prune(**settings) -> PruneStrategy:
    defaults = dict(base_model="B", models=("X", "Y", "Z"), num_layers=8, target_layers=6, lambda_range=(0.0, 1.6))
    return PruneStrategy(**{**defaults, **settings})


def test_prune_space_is_compact_and_fast_for_40_layers():
    strategy = prune(num_layers=40, target_layers=30)
    started = time.perf_counter()
    space = strategy.build_space()
    assert time.perf_counter() - started < 1.0
    assert len(space) == 40 * (1 + 3 + 2) and not space.forbidden_clauses and not space.conditions


def test_prune_removes_the_lowest_priorities_deeper_first_on_ties():
    strategy = prune()
    values = dict(strategy.build_space().get_default_configuration())
    assert strategy.removed_layers(values) == [6, 7]  # all tied: the deepest go first
    values.update({"layer_2_keep_priority": 0.1, "layer_5_keep_priority": 0.2, "layer_7_keep_priority": 0.9})
    assert strategy.removed_layers(values) == [2, 5]
    assert strategy.kept_layers(values) == [0, 1, 3, 4, 6, 7]


def test_prune_decode_reads_the_task_vector_base_at_the_source_layer(zoo):
    from auto_merge.merge.plan import ModelCatalog, compile_plan
    from auto_merge.merge.recipe import parse_recipe

    strategy = prune()
    values = dict(strategy.build_space().get_default_configuration())
    values.update(strategy.removal_values([0, 1]))
    values.update({"layer_5_candidate_0": 1, "layer_5_candidate_1": 0, "layer_5_candidate_2": 1,
                   "layer_5_merge_scale_factor": 0.6, "layer_5_output_scale": 0.8,
                   "layer_2_candidate_0": 0})
    recipe = strategy.decode(values)
    assert len(recipe["slices"]) == 6
    assert recipe["slices"][0] == {"merge_method": "passthrough", "sources": [{"model": "B", "layer_range": [2, 3]}]}
    merged = recipe["slices"][3]  # output layer 3 is source layer 5
    assert merged["merge_method"] == "task_arithmetic" and merged["base_layer_range"] == [5, 6]
    assert [s["model"] for s in merged["sources"]] == ["X", "Z"]
    assert merged["parameters"]["lambda"] == 0.6
    assert merged["parameters"]["output_scale"][0] == {"filter": "mlp.down_proj", "value": 0.8}

    zoo_strategy = prune(base_model="zoo:base", models=("zoo:num", "zoo:wrd", "zoo:col"))
    plan = compile_plan(parse_recipe(zoo_strategy.decode(values)), ModelCatalog())
    task = plan.task("model.layers.3.mlp.down_proj.weight")
    assert task.base.name == "model.layers.5.mlp.down_proj.weight"
    assert [t.name for t in task.inputs] == ["model.layers.5.mlp.down_proj.weight"] * 2
    assert task.output_scale == 0.8 and plan.task("model.layers.3.mlp.up_proj.weight").output_scale == 1.0
    assert plan.num_layers == 6


def test_prune_initial_design_covers_the_removal_heuristics():
    strategy = prune(num_layers=40, target_layers=30)
    heuristics = removal_heuristics(40, 10)
    assert heuristics["last_first"] == list(range(29, 39))
    assert heuristics["middle_outward"] == list(range(15, 25))
    assert heuristics["alternating"] == list(range(20, 39, 2))
    designs = strategy.initial_configurations(strategy.build_space())
    assert {tuple(strategy.removed_layers(dict(c))) for c in designs} == {tuple(v) for v in heuristics.values()}
    first = strategy.layer_plan(dict(designs[0]))
    assert all(models == ("X",) for models, *_ in first)  # the first design: expert 0 alone in every kept layer
    assert len(designs) == 3 * (3 + 1 + 2)


def test_reference_prune_configurations_import():
    strategy = PruneStrategy(base_model="meta-llama/Llama-2-13b-hf", models=REFERENCE_MODELS, num_layers=40,
                             target_layers=30)
    flat = json.loads((REFERENCE_SEARCH / "prune" / "13b" / "1.json").read_text())
    values = strategy.import_reference(flat)
    assert strategy.removed_layers(values) == [25, 26, 27, 28, 29, 30, 31, 32, 33, 39]
    plan = strategy.layer_plan(values)
    assert len(plan) == 30 and plan[0] == ((), 0, 0.7, 1.0)
    scaled = [(layer, scale) for _, layer, _, scale in plan if scale != 1.0]
    assert (12, pytest.approx(0.907091237718)) in scaled  # the reference searched these scales; here they act
    # The 7B files come from a 32-layer model with 9 removals.
    small = PruneStrategy(base_model="b", models=REFERENCE_MODELS, num_layers=32, target_layers=23)
    for name in ("1.json", "2.json", "3.json"):
        values = small.import_reference(json.loads((REFERENCE_SEARCH / "prune" / "7b" / name).read_text()))
        assert len(small.layer_plan(values)) == 23
    with pytest.raises(StrategyError, match="removes 9 layers; this space removes 10"):
        strategy.import_reference(json.loads((REFERENCE_SEARCH / "prune" / "7b" / "1.json").read_text()))


# ------------------------------------------------------------------------------------------- engine: depth, scale

@pytest.fixture(scope="module")
def zoo() -> Path:
    from auto_merge.zoo import zoo_root

    return zoo_root(0)


def test_folded_scale_equals_scaling_the_mlp_branch(zoo, tmp_path):
    """The checkpoint with the scale folded into down_proj computes h + Attn + s * MLP, as the search scored it."""
    from transformers import AutoModelForCausalLM

    from auto_merge.merge.engine import run_recipe
    from auto_merge.merge.recipe import parse_recipe

    strategy = DISStrategy(base_model="zoo:base", models=("zoo:num", "zoo:wrd", "zoo:col"), num_layers=8,
                           max_layers=12)
    values = selection(strategy, {2: [0, 2], 5: [1]}, scales={2: 0.6, 5: 1.7})
    folded_recipe = strategy.decode(values)
    unscaled = {**values, "scale_2": 1.0, "scale_5": 1.0}
    folded = AutoModelForCausalLM.from_pretrained(
        run_recipe(parse_recipe(folded_recipe), tmp_path / "folded").out_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(
        run_recipe(parse_recipe(strategy.decode(unscaled)), tmp_path / "plain").out_dir).eval()
    assert folded.config.num_hidden_layers == plain.config.num_hidden_layers == 9
    # Output layers: 0, 1, pos 2 -> num, col (scaled, layer 3), 3, 4, 5 -> wrd (scaled, layer 7), ...
    for layer, scale in ((3, 0.6), (6, 1.7)):
        plain.model.layers[layer].mlp.register_forward_hook(lambda module, args, output, s=scale: output * s)
    with torch.no_grad():
        assert torch.allclose(folded(PROMPTS).logits, plain(PROMPTS).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(folded(PROMPTS).logits, plain.__class__.from_pretrained(
            tmp_path / "plain")(PROMPTS).logits, atol=1e-3)


def test_live_model_follows_the_depth_of_each_candidate(zoo, tmp_path):
    """One live model takes candidates of 10, 8 and 6 layers and equals each streamed checkpoint (logits and greedy
    generation, which uses the KV cache per layer)."""
    from transformers import AutoModelForCausalLM

    from auto_merge.merge.engine import run_recipe
    from auto_merge.merge.live import LiveMerger
    from auto_merge.merge.recipe import parse_recipe

    model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    merger = LiveMerger(model, device="cpu")
    dis_strategy = DISStrategy(base_model="zoo:base", models=("zoo:num", "zoo:wrd", "zoo:col"), num_layers=8,
                               max_layers=12)
    deeper = dis_strategy.decode(selection(dis_strategy, {1: [0, 1], 4: [2, 0]}, scales={4: 0.5}))
    pruned = prune(base_model="zoo:base", models=("zoo:num", "zoo:wrd", "zoo:col"), target_layers=6)
    pruned_values = dict(pruned.build_space().get_default_configuration())
    pruned_values.update({"layer_3_candidate_1": 1, "layer_3_merge_scale_factor": 0.7})
    shallower = pruned.decode(pruned_values)
    whole = {"merge_method": "linear", "models": [{"model": "zoo:col", "parameters": {"weight": 1.0}}]}
    for index, (recipe, depth) in enumerate(((deeper, 10), (whole, 8), (shallower, 6), (deeper, 10))):
        merger.apply(recipe)
        reference = AutoModelForCausalLM.from_pretrained(
            run_recipe(parse_recipe(recipe), tmp_path / f"out{index}").out_dir).eval()
        assert len(model.model.layers) == model.config.num_hidden_layers == depth
        with torch.no_grad():
            assert torch.equal(model(PROMPTS).logits, reference(PROMPTS).logits)
        assert torch.equal(model.generate(PROMPTS, max_new_tokens=4, do_sample=False),
                           reference.generate(PROMPTS, max_new_tokens=4, do_sample=False))


# ------------------------------------------------------------------------------------------------- end to end

def write_config(folder: Path, strategy: str, block: dict) -> Path:
    config = {
        "strategy": strategy,
        "global_params": {
            "random_seed": 0,
            "output_path": str(folder / "runs"),
            "baselines": False,  # tested in test_search
            "evaluation": {
                "batch_size": 64, "device": "cpu", "include_path": str(REPO / "custom_tasks"),
                "tasks": [{"task": t, "metric": "exact_match,none"} for t in ("zoo_num", "zoo_wrd", "zoo_col")],
            },
        },
        "strategies": {strategy: {
            "base_model": "zoo:base", "models": ["zoo:num", "zoo:wrd", "zoo:col"], "num_hidden_layers": 8,
            "min_budget": 10, "max_budget": 30, "eta": 3, "n_trials": 7, "n_workers": 1, **block}},
    }
    path = folder / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_dis_search_runs_records_rejections_and_replays(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from auto_merge.search.driver import run_search
    from auto_merge.search.outputs import read_trials
    from auto_merge.search.replay import replay

    config = write_config(tmp_path, "dis", {"layers": 10, "layer_granularity": 2, "repeat": 2})
    result = run_search(config, show_progress=False)
    trials = read_trials(result.run_dir / "trials.jsonl")
    assert len(trials) == 7
    # The initial design: each expert alone (a 3-way repeat-2 space still starts from the plain experts).
    assert [t["recipe"]["slices"][0]["sources"][0]["model"] for t in trials[:3]] == ["zoo:num", "zoo:wrd", "zoo:col"]
    rejected = [t for t in trials if t["status"] != "success"]
    assert all("exceeds the maximum output depth 10" in t["error"] for t in rejected)
    assert all(t["examples"] is None for t in rejected)  # rejected before any evaluation
    model = AutoModelForCausalLM.from_pretrained(result.best_model)
    winner = json.loads((result.run_dir / "final_scores.json").read_text())["winners"][0]
    assert model.config.num_hidden_layers == sum(
        s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in winner["recipe"]["slices"])
    assert any(p.name == "winner_layers.png" and p.stat().st_size > 5000 for p in result.plots)
    replay(result.run_dir / "search_config" / "best.json", tmp_path / "replayed")
    replayed, written = load_file(tmp_path / "replayed" / "model.safetensors"), \
        load_file(result.best_model / "model.safetensors")
    assert replayed.keys() == written.keys() and all(torch.equal(replayed[k], written[k]) for k in written)


def test_multi_objective_prune_search_exports_a_front(tmp_path):
    from transformers import AutoModelForCausalLM

    from auto_merge.search.driver import run_search

    config = write_config(tmp_path, "prune", {
        "layers": 6, "multi_objective": True,
        "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.0, "max": 1.6}}}})
    result = run_search(config, show_progress=False)
    fronts = sorted((result.run_dir / "search_config").glob("front_*.json"))
    assert fronts and len(fronts) == len(result.best_configs)
    member = json.loads(fronts[0].read_text())
    assert member["strategy"]["strategy"] == "prune" and member["kind"] == "pareto_front_member"
    assert set(member["scores"]) == {"zoo_num", "zoo_wrd", "zoo_col"}
    assert AutoModelForCausalLM.from_pretrained(result.best_model).config.num_hidden_layers == 6
    assert any(p.name == "front.png" for p in result.plots)


def test_depth_configs_are_checked_before_any_model_is_loaded(tmp_path):
    from auto_merge.config import ConfigError, load_experiment

    config = load_experiment(write_config(tmp_path, "dis", {"layers": 20, "layer_granularity": 2, "repeat": 2,
                                                            "fix_layers": 1}))
    assert (config.selected.repeat, config.selected.layer_granularity) == (2, 2)
    # The position scales' range reaches the search space; a range that is not one is refused by name.
    config = load_experiment(write_config(tmp_path, "dis", {"layers": 12, "scale_range": [0.8, 1.2]}))
    from auto_merge.strategies import build_strategy

    space = build_strategy(config).build_space()
    assert (space["scale_0"].lower, space["scale_0"].upper) == (0.8, 1.2)
    with pytest.raises(ConfigError, match=r"strategies\.dis\.scale_range: \[1\.2, 0\.8\] is not a range.*"
                                          r"0 <= low < high"):
        load_experiment(write_config(tmp_path, "dis", {"layers": 12, "scale_range": [1.2, 0.8]}))
    with pytest.raises(ConfigError, match=r"strategies\.dis\.layer_granularity: 4 does not divide the 6 searched "
                                          r"layers.*one of \[1, 2, 3, 6\]"):
        load_experiment(write_config(tmp_path, "dis", {"layers": 20, "layer_granularity": 4, "fix_layers": 1}))
    with pytest.raises(ConfigError, match=r"strategies\.prune\.scale_filter: 'mlp\.c_proj' matches no tensor"):
        load_experiment(write_config(tmp_path, "prune", {
            "layers": 6, "scale_filter": "mlp.c_proj",
            "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.0, "max": 1.0}}}}))
    with pytest.raises(ConfigError, match=r"strategy prune needs at least 2 evaluation task"):
        path = write_config(tmp_path, "prune", {
            "layers": 6, "multi_objective": True,
            "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.0, "max": 1.0}}}})
        data = yaml.safe_load(path.read_text())
        data["global_params"]["evaluation"]["tasks"] = data["global_params"]["evaluation"]["tasks"][:1]
        path.write_text(yaml.safe_dump(data))
        load_experiment(path)
