"""docs/configuration.md, generated from the config schema's `description` fields.

    python -m slidetrain.docs.configuration > docs/configuration.md

Every key of workflow/schemas/config.schema.yaml is one row (dotted path, type, the default config's
value, description); the open blocks (`methods.<name>`, `tilebag.params`, ...) are listed from the
dataclasses that validate them (slidetrain.configs), with each field's default and source comment.
tests/test_docs.py fails when docs/configuration.md differs from this output, when a schema key has
no description, or when a key of config/config.yaml has no schema entry with one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG = REPO / "config" / "config.yaml"
COMMAND = "python -m slidetrain.docs.configuration > docs/configuration.md"
WILDCARD = "<name>"


@dataclasses.dataclass(frozen=True)
class Key:
    path: str  # dotted, with <name> for a block's free keys: datasets.<name>.sheet
    node: dict  # its schema node


def schema_keys(node: dict, prefix: str = "") -> Iterator[Key]:
    """Every key the schema names, depth first, in the schema's order."""
    for name, child in (node.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield Key(path, child)
        yield from schema_keys(child, path)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        yield from schema_keys(extra, f"{prefix}.{WILDCARD}" if prefix else WILDCARD)


def undescribed(schema: dict) -> list[str]:
    """Schema keys without a description (should be none)."""
    return [k.path for k in schema_keys(schema) if not str(k.node.get("description", "")).strip()]


def schema_node(schema: dict, parts: list[str]) -> dict | None:
    """The schema node of a config key path (free keys go through additionalProperties); None if the
    path is unknown to the schema, {} below an open object (whose keys the schema leaves free)."""
    node = schema
    for part in parts:
        props = node.get("properties") or {}
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
            if not node.get("properties"):
                return {}  # an open block (methods.<name>, tilebag.params): keys checked by dataclasses
        elif node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
            return {}
        else:
            return None
    return node


def config_keys(config: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(config, dict):
        for name, value in config.items():
            path = (*prefix, str(name))
            yield path
            yield from config_keys(value, path)


def config_keys_without_description(config: dict, schema: dict) -> list[str]:
    """Keys of `config` whose schema entry is missing or has no description (open blocks excepted)."""
    missing = []
    for path in config_keys(config):
        node = schema_node(schema, list(path))
        if node is None:
            missing.append(".".join(path) + " (not in the schema)")
        elif node and "description" not in node and schema_node(schema, list(path[:-1])) is not None:
            # a free key (a dataset's name) is described by its block; a named one needs its own
            parent = schema_node(schema, list(path[:-1])) if len(path) > 1 else schema
            if path[-1] in (parent.get("properties") or {}):
                missing.append(".".join(path))
    return missing


def _type(node: dict) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    t = node.get("type", "object" if "properties" in node else "")
    types = t if isinstance(t, list) else [t]
    out = []
    for one in types:
        if one == "array":
            item = node.get("items", {})
            inner = item.get("type") or ("enum" if "enum" in item else "")
            out.append(f"list of {inner}" if inner else "list")
        else:
            out.append(str(one))
    return " or ".join(x for x in out if x)


def _value(config: dict, path: str) -> str:
    if WILDCARD in path:
        return ""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    if isinstance(node, dict) and node:
        return ""  # a block: its keys have their own rows
    text = json.dumps(node, separators=(", ", ": "))
    return f"`{text}`" if len(text) <= 48 else f"`{text[:45]}...`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's source comment (trailing, or the comment lines just above it)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        last = None
        for line in lines[1:]:
            stripped = line.strip()
            m = re.match(r"^    (\w+):[^#]*?(?:#\s*(.*))?$", line)
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
            elif m and not line.startswith("     "):
                last = m.group(1)
                comments[last] = m.group(2) or " ".join(above)
                above = []
            elif line.startswith("        ") and last and "#" in line and not comments.get(last):
                comments[last] = line.split("#", 1)[1].strip()  # a default written over several lines
            elif stripped.startswith(("def ", "@")):
                above, last = [], None
            else:
                above = []
    return comments


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, tuple):
        value = list(value)
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value!r}`"


def dataclass_table(cls: type, preset: dict | None = None) -> list[str]:
    comments = _field_comments(cls)
    rows = ["| key | default | notes |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        default = f"`{json.dumps(preset[f.name])}` (fixed by the name)" if preset and f.name in preset else _default(f)
        rows.append(f"| `{f.name}` | {default} | {_cell(comments.get(f.name, ''))} |")
    return rows


def open_blocks() -> list[str]:
    """The keys of `methods.<name>` per method, and of the tile-bag blocks (TileBagConfig)."""
    from slidetrain.configs import METHODS
    from slidetrain.configs.tilebag import TileBagConfig

    out = [
        "## Method blocks (`methods.<name>`)",
        "",
        "Each method's block is checked against its config dataclass (`slidetrain.configs`) when the "
        "workflow is parsed: an unknown key is an error naming the method and key. Omitted keys take "
        "these defaults, the reference implementations' values.",
        "",
    ]
    by_class: dict[tuple[type, str], list[str]] = {}
    for name, info in METHODS.items():
        key = (info.config_cls, json.dumps(info.preset, sort_keys=True))
        by_class.setdefault(key, []).append(name)
    for (cls, preset_text), names in by_class.items():
        preset = json.loads(preset_text)
        out += [f"### {', '.join(f'`{n}`' for n in names)} (`{cls.__module__}.{cls.__name__}`)", ""]
        out += dataclass_table(cls, preset)
        out.append("")
    out += [
        "## Tile-bag keys (`tilebag.params`, `tilebag.strategies.<name>`, `offload_tables.params`, "
        "`offload_tables.encoders.<name>`, `offload_tables.tables.<name>.params`)",
        "",
        "`slidetrain.configs.tilebag.TileBagConfig`: omitted keys take the authors' values "
        "(Campanella et al.'s script).",
        "",
    ]
    out += dataclass_table(TileBagConfig)
    out.append("")
    return out


def render(schema: dict | None = None, config: dict | None = None) -> str:
    schema = schema if schema is not None else yaml.safe_load(SCHEMA.read_text())
    config = config if config is not None else yaml.safe_load(CONFIG.read_text())
    missing = undescribed(schema)
    if missing:
        raise ValueError(f"{SCHEMA}: keys without a description: {missing}")
    out = [
        "# Configuration",
        "",
        "<!-- Generated from workflow/schemas/config.schema.yaml by "
        f"`{COMMAND}`; edit the schema's descriptions, not this page. -->",
        "",
        "Every key the workflow reads. `config/config.yaml` is the default (the synthetic dataset at CPU "
        "scale); a `--configfile` merges over it, except that the blocks that name things (`datasets`, "
        "each `methods.<name>`, `splits.official`) replace the default's. The value column shows "
        "`config/config.yaml`'s value; an empty cell means the key is unset there (its default applies) "
        "or is a block. `<name>` stands for a name you choose.",
        "",
    ]
    for top, node in (schema.get("properties") or {}).items():
        out += [f"## `{top}`", "", _cell(node["description"]), ""]
        rows = list(schema_keys(node, top)) or [Key(top, node)]  # a block's keys, or the key itself
        out += ["| key | type | config.yaml | description |", "|---|---|---|---|"]
        for key in rows:
            out.append(
                f"| `{key.path}` | {_type(key.node)} | {_value(config, key.path)} | {_cell(key.node['description'])} |"
            )
        out.append("")
    out += open_blocks()
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
