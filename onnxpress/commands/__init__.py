"""CLI extensions: every module in this package may define

    def add_commands(subparsers) -> None                 # new subcommands (argparse)
    def add_inspect_options(parser) -> None              # extra flags for `onnxpress inspect`
    def inspect_sections(model, args, console) -> None   # print extra sections in `inspect`

`onnxpress.cli` imports them all, so a capability adds its commands without editing cli.py.
Each command function receives the parsed args and returns an exit code (0 on success).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def extension_modules() -> list[ModuleType]:
    mods = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        mods.append(importlib.import_module(f"{__name__}.{info.name}"))
    return mods
