"""Loading a manifest's YAML safely: SafeLoader tags only, ``1e-4`` read as a number, and
duplicate keys, recursive aliases and "billion laughs" expansions refused before anything
is built."""

from __future__ import annotations

import re
from typing import Any

import yaml

from acctattr.errors import ManifestError

MAX_YAML_NODES = 2_000_000  # after alias expansion; a 1M-step per-step lr list fits


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float.

    YAML 1.1, which PyYAML implements, needs a dot (``1.0e-4``); without this, ``lr: 3e-4`` or
    ``eps: 1e-8`` would be strings and rejected. YAML 1.2 and every ML config read them as floats.

    A scalar its constructor cannot build (``!!int abc``, ``!!timestamp 2001-13-45``,
    ``!!bool maybe``, ``0x_``, an integer of more than 4300 digits) raises a plain ValueError
    or KeyError in PyYAML; it becomes a YAML error at that node's line.
    """

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            detail = e.args[0] if isinstance(e, KeyError) and e.args else e
            text = str(node.value)
            shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown} as {node.tag.rsplit(':', 1)[-1]}: {detail}",
                node.start_mark) from e


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class _YamlRefused(Exception):
    """A YAML document refused before it is built (duplicate keys, aliases, size)."""


def load_yaml(text: str, shown: str) -> Any:
    """A YAML document, safely: SafeLoader tags only, and refused (ManifestError) when a
    mapping repeats a key (the last would silently win), an alias refers to a node that
    contains it (a recursive structure), or aliases expand to more than MAX_YAML_NODES
    nodes ("billion laughs"). Checked on the node graph, before anything is built."""
    loader: Loader | None = None
    try:
        loader = Loader(text)  # the reader refuses non-printable characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    except _YamlRefused as e:
        raise ManifestError(shown, [str(e)]) from None
    except yaml.YAMLError as e:
        detail = str(e).replace("\n", " ")
        hint = " (Python object tags such as !!python/object are never loaded)" \
            if "python/" in detail else ""
        raise ManifestError(shown, [f"not valid YAML{hint}: {detail}"]) from e
    except RecursionError as e:
        raise ManifestError(shown, ["not valid YAML: nested too deeply"]) from e
    finally:
        if loader is not None:
            loader.dispose()


def _check_nodes(root: yaml.Node) -> None:
    """Duplicate keys, recursive aliases and the expanded size, without recursion (the
    graph is walked once per distinct node; an alias is a second edge to the same node)."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in children)
            if total > MAX_YAML_NODES:
                raise _YamlRefused(
                    f"line {node.start_mark.line + 1}: its aliases expand to more than "
                    f"{MAX_YAML_NODES:,} values (a manifest is small; is this a 'billion "
                    "laughs' document?)")
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise _YamlRefused(f"line {node.start_mark.line + 1}: a recursive alias (a node "
                               "that contains itself); write the value out")
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_duplicates(node)
        stack.append((node, True))
        for c in children:
            if id(c) in on_path:
                raise _YamlRefused(f"line {c.start_mark.line + 1}: a recursive alias (a node "
                                   "that contains itself); write the value out")
            if id(c) not in size:
                stack.append((c, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_duplicates(node: yaml.MappingNode) -> None:
    seen: dict[str, int] = {}
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
            continue
        line = k.start_mark.line + 1
        if k.value in seen:
            raise _YamlRefused(f"line {line}: duplicate key {k.value!r} (also on line "
                               f"{seen[k.value]}); YAML would silently keep the last; "
                               "remove one")
        seen[k.value] = line
