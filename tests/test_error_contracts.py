"""The error contracts other parts rely on (issue 12): every error meant for the user is an AutoMergeError (the CLI
prints those without a traceback and lets anything else surface as a bug), and errors carry where the problem is
as data (`key_path`, `param`, `model_index`) so no caller parses another part's message text."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import auto_merge.cli as cli
import auto_merge.config.errors as config_errors
import auto_merge.evaluation.plugins as plugins
import auto_merge.formats.mergekit as mergekit_format
import auto_merge.merge.engine as engine
import auto_merge.merge.recipe as recipe_module
import auto_merge.merge.tokenizer as tokenizer
import auto_merge.models.inspect as model_inspect
import auto_merge.models.resolve as resolve
import auto_merge.output_dirs as output_dirs
import auto_merge.search.driver as driver
import auto_merge.search.replay as replay
import auto_merge.strategies.lfs as lfs
import auto_merge.strategies.oneshot as oneshot
from auto_merge.errors import AutoMergeError
from auto_merge.merge.methods.spec import ParamError, validate_params
from auto_merge.merge.recipe import RecipeError, parse_recipe, split_key
from auto_merge.models.inspect import PickleRefusedError, list_tensor_names

USER_FACING_MODULES = (cli, config_errors, plugins, engine, recipe_module, mergekit_format, tokenizer, model_inspect,
                       resolve, output_dirs, driver, replay, lfs, oneshot)


def test_every_user_facing_error_class_is_an_auto_merge_error():
    classes = [cls for module in USER_FACING_MODULES for name, cls in vars(module).items()
               if inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == module.__name__
               and name.endswith("Error")]
    assert len(classes) >= 14
    assert [cls.__name__ for cls in classes if not issubclass(cls, AutoMergeError)] == []


def test_value_errors_stay_value_errors_for_library_callers():
    for cls in (config_errors.ConfigError, RecipeError, replay.ReplayError, lfs.StrategyError,
                model_inspect.ModelInspectionError, resolve.ModelResolutionError, plugins.TaskConfigError):
        assert issubclass(cls, ValueError), cls


@pytest.mark.parametrize("key, path", [
    ("slices[1].sources[0].layer_range", ("slices", 1, "sources", 0, "layer_range")),
    ("models[2].parameters.weight", ("models", 2, "parameters", "weight")),
    ("merge_method", ("merge_method",)),
    (None, ()),
])
def test_split_key(key, path):
    assert split_key(key) == path


def test_a_recipe_error_carries_its_key_path():
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b", "parameters": 3}]},
                     source="r.yml")
    assert caught.value.key_path[:2] == ("models", 1)
    assert str(caught.value).startswith("r.yml: models[1]")


def test_a_param_error_names_the_parameter_and_the_model():
    with pytest.raises(ParamError) as caught:
        validate_params("ties", {}, [{"density": 0.5, "weight": 1.0}, {"density": 2.0, "weight": 1.0}])
    assert (caught.value.param, caught.value.model_index) == ("density", 1)
    with pytest.raises(ParamError) as caught:
        validate_params("task_arithmetic", {"lambda": "big"}, [{}, {}])
    assert (caught.value.param, caught.value.model_index) == ("lambda", None)


def test_a_refused_pickle_checkpoint_says_how_to_allow_it_where_it_is_read(tmp_path: Path):
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError) as caught:
        list_tensor_names(tmp_path)
    assert "global_params.allow_pickle: true" in str(caught.value)
    flagged = caught.value.with_opt_in("pass --allow-pickle")
    assert "pass --allow-pickle" in str(flagged) and "global_params" not in str(flagged)
    assert flagged.folder == tmp_path and flagged.file_name == "pytorch_model.bin"
    assert list_tensor_names(tmp_path, allow_pickle=True) == ["w"]


def test_the_cli_prints_an_auto_merge_error_without_a_traceback_and_lets_a_bug_surface(monkeypatch, capsys):
    def user_problem(args):
        raise resolve.ModelResolutionError("model 'x' is not available offline")

    def bug(args):
        raise KeyError("internal")

    parser = cli.build_parser()
    for handler, expected in ((user_problem, 2), (bug, None)):
        monkeypatch.setattr(cli, "build_parser", lambda handler=handler: _with_handler(parser, handler))
        if expected is None:
            with pytest.raises(KeyError):
                cli.main(["validate", "--config", "x.yaml"])
        else:
            assert cli.main(["validate", "--config", "x.yaml"]) == expected
            assert capsys.readouterr().err.strip() == "error: model 'x' is not available offline"


def _with_handler(parser, handler):
    parser.set_defaults(handler=handler)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(handler=handler)
    return parser
