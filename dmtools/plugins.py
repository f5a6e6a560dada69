"""Entry points of the installed distributions, read without :mod:`importlib.metadata`.

The command line lists its sub-commands from the ``dmtools.commands`` group on every start;
``importlib.metadata`` costs more to import (email, zipfile, csv, pathlib) than the rest of
``dmtools --help``. This reads the same files it reads: ``entry_points.txt`` of each
``*.dist-info`` / ``*.egg-info`` directory on ``sys.path``, the first distribution of a name winning
(the packaging specification's "entry points file" format: INI sections named for groups,
``name = module:attr`` lines).
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from dmtools.record import record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["EntryPoint", "entry_points"]

_SECTION = re.compile(r"\[\s*(?P<group>[^\]]+?)\s*\]")


@record(frozen=True)
class EntryPoint:
    """One ``name = module:attr`` line of ``group``."""

    name: str
    value: str
    group: str

    def load(self) -> Any:
        """Import the module and return the attribute the entry point names."""
        module, _, attrs = self.value.partition(":")
        obj: Any = importlib.import_module(module.strip())
        for attr in filter(None, attrs.strip().split(".")):
            obj = getattr(obj, attr)
        return obj


def _parse(text: str, group: str) -> list[EntryPoint]:
    found: list[EntryPoint] = []
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        section = _SECTION.fullmatch(line)
        if section:
            current = section.group("group")
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            found.append(EntryPoint(name.strip(), value.strip(), group))
    return found


def entry_points(group: str) -> list[EntryPoint]:
    """The entry points of ``group`` over the distributions importable from ``sys.path``."""
    seen: set[str] = set()
    found: list[EntryPoint] = []
    for base in sys.path:
        try:
            names = sorted(os.listdir(base or "."))
        except OSError:
            continue
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext not in (".dist-info", ".egg-info"):
                continue
            dist = re.sub(r"[-_.]+", "_", stem.partition("-")[0]).lower()
            if dist in seen:
                continue
            seen.add(dist)
            try:
                with open(os.path.join(base or ".", name, "entry_points.txt"), encoding="utf-8") as f:
                    found.extend(_parse(f.read(), group))
            except OSError:
                continue
    return found
