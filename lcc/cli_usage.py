"""Usage lines that name a command's arguments as their help does (`lcc run train [OPTIONS] SPEC|PLAN_DIR`),
for every command of the `lcc` app, those other modules register included."""

from __future__ import annotations

from typing import Any

import typer


class UsageCommand(typer.core.TyperCommand):
    """A command whose usage line names its arguments as their help does (`lcc run train [OPTIONS]
    SPEC|PLAN_DIR`): typer writes a required argument as `{name}`, which reads as a placeholder syntax."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(usage_name(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def usage_name(argument: Any) -> str:
    """An argument as a usage line shows it: its metavar (or name in capitals), `...` when it repeats, in
    brackets when it may be left out."""
    name = argument.metavar or argument.name.upper()
    if argument.nargs != 1:
        name += "..."
    return name if argument.required else f"[{name}]"


def name_arguments_in_usage(group: typer.Typer) -> None:
    """Every command of the group and its subgroups, those registered by other modules included, uses
    `UsageCommand` (unless it chose a class of its own)."""
    for info in group.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = UsageCommand
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            name_arguments_in_usage(sub.typer_instance)
