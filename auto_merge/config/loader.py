"""YAML loading with `!include` (relative to the including file, recursive, cycle-checked) and a source map that
remembers which file and line every key came from, so errors can name the file the user has to edit.

Configs are data, never code, and loading one is bounded:
- only YAML's core tags (str, int, float, bool, null, seq, map, and `<<` merge keys) and `!include`; the reference's
  `!function` and every `!!python/...` tag are refused, on scalars, lists and mappings alike;
- `!include` reads only `.yaml`/`.yml` files inside the top-level config's folder (no absolute paths, no `..` out
  of it), and never echoes another file's content;
- a file is at most :data:`MAX_FILE_BYTES`, and the document at most :data:`MAX_NODES` values once aliases are
  expanded (an alias "bomb" of nested anchors is an error, not a hang).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from auto_merge.config.errors import ConfigError, ConfigProblem, KeyPath, Location, SourceMap

if TYPE_CHECKING:
    from auto_merge.config.schema import ExperimentConfig

INCLUDE_TAG = "!include"
FUNCTION_TAG = "!function"
_STANDARD_TAG_PREFIX = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {_STANDARD_TAG_PREFIX + name for name in ("str", "int", "float", "bool", "null", "seq", "map")}
_ALLOWED_TAGS_TEXT = "plain YAML values (strings, numbers, booleans, null, lists, mappings) and !include"
_TIMESTAMP_TAG = _STANDARD_TAG_PREFIX + "timestamp"
_MERGE_TAG = _STANDARD_TAG_PREFIX + "merge"
INCLUDE_SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 64  # PyYAML composes nodes recursively: a deeper document would exhaust Python's stack
_OPENING_TOKENS = (yaml.BlockSequenceStartToken, yaml.BlockMappingStartToken, yaml.FlowSequenceStartToken,
                   yaml.FlowMappingStartToken)
_CLOSING_TOKENS = (yaml.BlockEndToken, yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)


@dataclass
class LoadedYaml:
    """A config document with every `!include` inlined, plus where each key came from."""

    path: Path
    data: Any
    sources: SourceMap


def load_yaml_with_includes(path: str | Path) -> LoadedYaml:
    """Parse `path`, inline `!include` files (paths relative to the including file), refuse `!function` and any other
    custom tag, refuse duplicate keys. Every failure is a ConfigError naming the offending file."""
    root = Path(path).expanduser().resolve()
    sources = SourceMap(root_file=root)
    builder = _DocumentBuilder(sources, confine_to=root.parent)
    data = builder.load_file(root, key_path=(), include_chain=(), included_from=None)
    return LoadedYaml(path=root, data=data, sources=sources)


def _check_nesting(text: str, file: Path) -> None:
    """Refuse a document nested deeper than MAX_DEPTH before composing it (the scanner is iterative, the composer
    is not)."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPENING_TOKENS):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError.single(file, f"lists/mappings nested more than {MAX_DEPTH} deep",
                                         line=token.start_mark.line + 1,
                                         allowed=f"at most {MAX_DEPTH} levels of nesting")
        elif isinstance(token, _CLOSING_TOKENS):
            depth -= 1


class _DocumentBuilder:
    """Turns YAML node trees into plain Python data while recording marks in the source map."""

    def __init__(self, sources: SourceMap, confine_to: Path):
        self.sources = sources
        self.confine_to = confine_to
        self.nodes_built = 0

    def _error(self, location: Location, key_path: KeyPath | None, message: str, allowed: str) -> ConfigError:
        return ConfigError([ConfigProblem(location, key_path, message, allowed)], config_file=self.sources.root_file)

    def load_file(
        self,
        file: Path,
        *,
        key_path: KeyPath,
        include_chain: tuple[Path, ...],
        included_from: Location | None,
    ) -> Any:
        reference_location = included_from or Location(file)
        if not file.is_file():
            what = ("not found" if not file.exists() else "is a folder, not a file" if file.is_dir()
                    else "is not a regular file")
            if included_from is None:
                raise ConfigError.single(file, f"config file {what}", allowed="a path to an existing YAML file")
            raise self._error(included_from, key_path, f"!include file {what}: {file}",
                              "a YAML file path relative to the including file's folder")
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise self._error(reference_location, key_path if included_from else None,
                              f"{file} is {size} bytes, more than a config can be", f"at most {MAX_FILE_BYTES} bytes")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise self._error(reference_location, key_path if included_from else None,
                              f"cannot read {file}: {error}", "a readable UTF-8 YAML file") from error
        loader = None
        try:
            try:
                _check_nesting(text, file)
                loader = yaml.SafeLoader(text)  # checks the characters: a control byte is an error here
                root_node = loader.get_single_node()
            except yaml.MarkedYAMLError as error:
                mark = error.problem_mark or error.context_mark
                line = mark.line + 1 if mark is not None else None
                problem = " ".join(part for part in (error.context, error.problem) if part)
                raise ConfigError.single(file, f"YAML syntax error: {problem}", line=line,
                                         allowed="well-formed YAML") from error
            except yaml.reader.ReaderError as error:  # a character YAML does not allow (a control byte)
                line = text.count("\n", 0, error.position) + 1
                character = (f"U+{error.character:04X}" if isinstance(error.character, int)
                             else repr(error.character))
                raise ConfigError.single(file, f"character {character} is not allowed in YAML", line=line,
                                         allowed="printable text (tabs and newlines are fine)") from error
            except yaml.YAMLError as error:
                raise ConfigError.single(file, f"YAML error: {error}", allowed="well-formed YAML") from error
            if root_node is None:  # an empty file is an empty document
                self.sources.value_locations[key_path] = Location(file, 1)
                return None
            self.sources.value_locations[key_path] = Location(file, root_node.start_mark.line + 1)
            return self._build(loader, root_node, file, key_path, include_chain + (file,), active_nodes=set())
        finally:
            if loader is not None:
                loader.dispose()

    def _build(
        self,
        loader: yaml.SafeLoader,
        node: Node,
        file: Path,
        key_path: KeyPath,
        include_chain: tuple[Path, ...],
        active_nodes: set[int],
    ) -> Any:
        location = Location(file, node.start_mark.line + 1)
        self.nodes_built += 1
        if self.nodes_built > MAX_NODES:  # aliases are expanded: nested anchors grow exponentially
            raise self._error(location, key_path, f"the config expands to more than {MAX_NODES} values (YAML "
                              f"aliases referring to aliases?)", "a config of ordinary size")
        if node.tag == INCLUDE_TAG:
            return self._include(loader, node, file, key_path, include_chain, location)
        if node.tag == FUNCTION_TAG:
            raise self._error(location, key_path, "the !function tag is not supported (configs may not run code)",
                              "plain YAML values and !include")
        if node.tag not in _ALLOWED_TAGS and not (node.tag == _TIMESTAMP_TAG and isinstance(node, ScalarNode)):
            tag = node.tag.replace(_STANDARD_TAG_PREFIX, "!!")
            raise self._error(location, key_path, f"YAML tag {tag} is not allowed (configs are data, never code)",
                              _ALLOWED_TAGS_TEXT)
        if id(node) in active_nodes:  # an alias to one of its own ancestors
            raise self._error(location, key_path, "recursive YAML alias",
                              "aliases to values that do not contain themselves")
        if isinstance(node, ScalarNode):
            if node.tag == _TIMESTAMP_TAG:  # an unquoted date is text here (names, notes), never a datetime
                return str(node.value)
            return loader.construct_object(node, deep=True)
        active_nodes = active_nodes | {id(node)}
        if isinstance(node, SequenceNode):
            items = []
            for index, item_node in enumerate(node.value):
                item_path = key_path + (index,)
                self.sources.key_locations[item_path] = Location(file, item_node.start_mark.line + 1)
                self.sources.value_locations.setdefault(item_path, Location(file, item_node.start_mark.line + 1))
                items.append(self._build(loader, item_node, file, item_path, include_chain, active_nodes))
            return items
        if isinstance(node, MappingNode):
            explicit = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
            try:
                loader.flatten_mapping(node)  # expands `<<: *anchor` merge keys (their pairs come first)
            except yaml.MarkedYAMLError as error:
                raise self._error(location, key_path, f"bad merge key: {error.problem}",
                                  "`<<:` with a mapping or list of mappings") from error
            merged = len(node.value) - explicit
            mapping: dict[Any, Any] = {}
            from_merge: set = set()
            for index, (key_node, value_node) in enumerate(node.value):
                key_location = Location(file, key_node.start_mark.line + 1)
                if not isinstance(key_node, ScalarNode) or key_node.tag not in _ALLOWED_TAGS:
                    raise self._error(key_location, key_path, "mapping keys must be plain scalars",
                                      "plain scalar keys")
                key = loader.construct_object(key_node, deep=True)
                child_path = key_path + (key,)
                if index < merged:  # YAML merge semantics: the first merged value wins, written keys override
                    if key in mapping:
                        continue
                    from_merge.add(key)
                elif key in mapping and key not in from_merge:
                    raise self._error(key_location, child_path, "duplicate key",
                                      "each key once per mapping")
                elif key in from_merge:  # a written key overriding a merged one: it is where the value comes from
                    from_merge.discard(key)
                    self.sources.value_locations.pop(child_path, None)
                self.sources.key_locations[child_path] = key_location
                self.sources.value_locations.setdefault(child_path, Location(file, value_node.start_mark.line + 1))
                mapping[key] = self._build(loader, value_node, file, child_path, include_chain, active_nodes)
            return mapping
        raise self._error(location, key_path, f"unsupported YAML node {type(node).__name__}",
                          "scalars, lists and mappings")

    def _include(
        self,
        loader: yaml.SafeLoader,
        node: Node,
        file: Path,
        key_path: KeyPath,
        include_chain: tuple[Path, ...],
        location: Location,
    ) -> Any:
        if not isinstance(node, ScalarNode) or not str(node.value).strip():
            raise self._error(location, key_path, "!include needs a file name",
                              "`!include other.yaml` (a path relative to this file)")
        name = str(node.value).strip()
        allowed = (f"a .yaml/.yml file inside {self.confine_to} (the top-level config's folder), given relative "
                   f"to the including file")
        if Path(name).is_absolute() or name.startswith("~"):
            raise self._error(location, key_path, f"!include {name}: absolute paths are not allowed", allowed)
        target = (file.parent / name).resolve()
        if target != self.confine_to and self.confine_to not in target.parents:
            raise self._error(location, key_path, f"!include {name}: outside the config's folder", allowed)
        if target.suffix.lower() not in INCLUDE_SUFFIXES:
            raise self._error(location, key_path, f"!include {name}: not a YAML file name", allowed)
        if target in include_chain:
            cycle = " -> ".join(path.name for path in include_chain[include_chain.index(target):] + (target,))
            raise self._error(location, key_path, f"!include cycle: {cycle}",
                              "includes that do not (indirectly) include themselves")
        # The included file's own marks replace the including line as the value's location.
        self.sources.value_locations.pop(key_path, None)
        return self.load_file(target, key_path=key_path, include_chain=include_chain, included_from=location)


def load_experiment(
    path: str | Path,
    *,
    check_models: bool = True,
    extra_aliases: Mapping[str, str] | None = None,
    build_zoo: bool = True,
) -> "ExperimentConfig":
    """Load and validate an experiment config; raise ConfigError (file, line, key, allowed values) on any problem.

    Stage 1: YAML + `!include` + the typed schema (every strategy block is type-checked; the selected one must be
    runnable). Stage 2, if `check_models`: resolve the selected strategy's model references (`extra_aliases` are
    added to `global_params.model_aliases` and win; `build_zoo=False` never builds the demo zoo) and cross-check
    them against the config from `config.json` and safetensors headers only. No weights are loaded."""
    from auto_merge.config.checks import check_experiment_models
    from auto_merge.config.schema import validate_experiment_data

    loaded = load_yaml_with_includes(path)
    config = validate_experiment_data(loaded.data, loaded.sources)
    if check_models:
        check_experiment_models(config, extra_aliases=extra_aliases, build_zoo=build_zoo)
    return config
