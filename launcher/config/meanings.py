"""What each config key means, in one line: the comment written beside its field in the schema.

One source for every reader: `launcher train --cfg job` prints each key's meaning as a YAML comment, and
scripts/config_reference.py builds docs/config.md from the same comments. A field's comment is read from
the source of its dataclass (or of the nearest base class that declares it with one); an Enum field also
lists its choices.
"""
from __future__ import annotations

import inspect
import re
import typing
from dataclasses import MISSING, fields, is_dataclass
from enum import Enum
from typing import Dict, List

FIELD = re.compile(r"^\s+(\w+):[^=#]*(?:=.*?)?(?:#\s*(.*))?$")
KEY = re.compile(r"^(\s*)([\w-]+):(.*)$")


def comments(cls: type) -> Dict[str, str]:
    """Field name -> the `# comment` on its line, from `cls` and its dataclass bases (the nearest wins)."""
    out: Dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines()[1:]:
            m = FIELD.match(line)
            if m and m.group(2):
                out[m.group(1)] = m.group(2).strip()
    return out


def choices(kind) -> List[str]:
    return [c.value for c in kind] if isinstance(kind, type) and issubclass(kind, Enum) else []


def meanings(cls: type, prefix: str = "") -> Dict[str, str]:
    """Dotted key -> its meaning, for every leaf of the dataclass `cls` (nested dataclasses recursed into)."""
    notes, hints, out = comments(cls), typing.get_type_hints(cls), {}
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out.update(meanings(type(default), f"{prefix}{f.name}."))
            continue
        options = ", ".join(choices(hints[f.name]))
        out[prefix + f.name] = "; ".join(filter(None, [notes.get(f.name, ""), options and f"one of {options}"]))
    return out


def annotate(yaml_text: str, meaning: Dict[str, str]) -> str:
    """`key: value` lines of a block-style YAML document (OmegaConf's) with `  # <meaning>` appended."""
    out, path = [], []  # path: (indent, key) of the mappings around the current line
    for line in yaml_text.splitlines():
        m = KEY.match(line)
        if m is None:
            out.append(line)
            continue
        indent, key, value = len(m.group(1)), m.group(2), m.group(3).strip()
        path = [(i, k) for i, k in path if i < indent]
        dotted = ".".join([k for _, k in path] + [key])
        if not value:  # a mapping (or a block list) follows
            path.append((indent, key))
        note = meaning.get(dotted)
        out.append(f"{line}  # {note}" if note and "#" not in value else line)
    return "\n".join(out) + ("\n" if yaml_text.endswith("\n") else "")
