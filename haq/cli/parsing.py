"""The command line's parser pieces: help that shows each default once, one flag per recipe field, and
the thread count every command that computes takes."""
from __future__ import annotations

import argparse


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, once: not for those whose help states it, nor for a None
    or False one (an unset option, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in (action.help or ""):  # `is`: a default of 0 is shown (0 == False)
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """haq's parsers and subparsers: defaults in the help (DefaultsHelp)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"formatter_class": DefaultsHelp, **kwargs})


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """One flag per recipe field, typed and with its default in the help; unset flags leave the
    field to --recipe FILE, then to the recipe's default."""
    import dataclasses
    import typing

    from haq.quant.recipe import FIELD_HELP, Recipe

    hints = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        kind, flag = hints[f.name], "--" + f.name.replace("_", "-")
        extra: dict = {"type": kind} if kind in (int, float) else {}
        if kind is bool:
            extra = {"action": argparse.BooleanOptionalAction}
        elif typing.get_origin(kind) is typing.Literal:
            extra = {"choices": [c for c in typing.get_args(kind) if c != "fp"]}  # fp: nothing to quantize
        if "type" in extra:
            extra["metavar"] = f.name.upper()
        p.add_argument(flag, dest=f"recipe_{f.name}", default=argparse.SUPPRESS,
                       help=f"{FIELD_HELP[f.name]} (default: {f.default})", **extra)


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core); on a busy or 2-core machine 1 "
                        "avoids OpenMP stalls in the many small ops of a decode step")


def apply_threads(args: argparse.Namespace) -> None:
    """--threads, for the commands that take it, before any work."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    from haq.errors import HaqError

    if threads < 1:
        raise HaqError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
