"""Reading recipe files: one recipe (mergekit's YAML schema, or the reference implementation's `merging_method`
format, translated on reading by :mod:`auto_merge.formats.reference_recipe`) or a mergekit-multi file of stages.
The merge engine itself only takes :class:`auto_merge.merge.recipe.Recipe` objects in its own schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from auto_merge.formats.reference_recipe import read_recipe
from auto_merge.merge.recipe import Recipe, RecipeError


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a one-recipe YAML file (mergekit schema or the reference's slice format). A file of several
    stages (mergekit-multi) is read with :func:`load_stages`."""
    source = str(path)
    documents = _read_documents(path)
    if len(documents) != 1:
        raise RecipeError(f"expected one YAML document, found {len(documents)}"
                          + (" (a mergekit-multi file of stages: `auto-merge merge` runs it, load_stages reads it)"
                             if len(documents) > 1 else ""), source=source)
    document = documents[0]
    if isinstance(document, Mapping) and "name" in document:  # a one-stage mergekit-multi file
        _stage_name(document["name"], source)
        document = {key: value for key, value in document.items() if key != "name"}
    return read_recipe(document, source=source)


def _read_documents(path: str | Path) -> list:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"cannot read the recipe: {error}", source=str(path)) from None
    try:
        return [document for document in yaml.safe_load_all(text) if document is not None]
    except yaml.YAMLError as error:
        raise RecipeError(f"not valid YAML: {error}", source=str(path)) from None


# A stage's name becomes the name of its folder.
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class RecipeStage:
    """One document of a mergekit-multi file: its ``name`` (None for the unnamed final merge), its recipe, its
    document number (0-based) and the names of the earlier stages whose outputs it merges."""

    name: str | None
    recipe: Recipe
    document: int
    uses: tuple[str, ...] = ()
    final: bool = False

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name else "the final merge"


def load_stages(path: str | Path) -> list[RecipeStage]:
    """Read a recipe file of one or more YAML documents (mergekit-multi): each document a recipe with a ``name``, at
    most one without (the final merge). A model reference equal to a stage's name means that stage's output. The
    final merge is the unnamed document, else the last document no other stage uses. Returns the stages in the order to run them: each after
    the stages it uses, otherwise in file order, the final merge last. Errors name the document and the key."""
    source = str(path)
    documents = _read_documents(path)
    if not documents:
        raise RecipeError("the file holds no recipe", source=source)
    names: list[str | None] = []
    for index, document in enumerate(documents):
        where = f"{source} (document {index + 1})" if len(documents) > 1 else source
        if not isinstance(document, Mapping):
            raise RecipeError(f"a recipe is a mapping, got {type(document).__name__}", source=where)
        name = _stage_name(document["name"], where) if "name" in document else None
        if name is not None and name in names:
            raise RecipeError(f"stage {name!r} is defined twice (documents {names.index(name) + 1} and {index + 1})",
                              source=where, key="name", allowed="a name per stage")
        if name is None and None in names:
            raise RecipeError(f"documents {names.index(None) + 1} and {index + 1} both have no name; only the final "
                              "merge may be unnamed", source=where, key="name", allowed="a name per stage")
        names.append(name)
    parsed = []
    for index, document in enumerate(documents):
        where = f"{source} (document {index + 1})" if len(documents) > 1 else source
        data = {key: value for key, value in document.items() if key != "name"}
        recipe = read_recipe(data, source=where)
        uses = tuple(ref for ref in recipe.model_refs() if ref in names and ref is not None)
        if names[index] in uses:
            raise RecipeError(f"stage {names[index]!r} merges its own output", source=where, key="name")
        parsed.append((recipe, uses))
    used = {name for _, uses in parsed for name in uses}
    final_index = names.index(None) if None in names else max(i for i, name in enumerate(names) if name not in used
                                                              ) if set(names) - used else len(names) - 1
    stages = [RecipeStage(names[index], recipe, index, uses, final=index == final_index)
              for index, (recipe, uses) in enumerate(parsed)]
    return _stage_order(stages, source)


def _stage_name(value: Any, source: str) -> str:
    if not isinstance(value, str) or not STAGE_NAME.fullmatch(value):
        raise RecipeError(f"{value!r} is not a stage name (it names the stage's folder)", source=source, key="name",
                          allowed="letters, digits, '.', '_' and '-', starting with a letter or digit")
    return value


def _stage_order(stages: list[RecipeStage], source: str) -> list[RecipeStage]:
    """Each stage after the stages it uses, otherwise in file order; the final merge last."""
    done: list[RecipeStage] = []
    names_done: set[str] = set()
    pending = [stage for stage in stages if not stage.final] + [stage for stage in stages if stage.final]
    while pending:
        ready = next((stage for stage in pending if set(stage.uses) <= names_done), None)
        if ready is None:
            cycle = ", ".join(repr(stage.name) for stage in pending)
            raise RecipeError(f"the stages {cycle} use each other's outputs in a cycle", source=source)
        pending.remove(ready)
        done.append(ready)
        if ready.name is not None:
            names_done.add(ready.name)
    return done
