"""Command-line options generated from ErqConfig's fields: one generator for `erq quantize` (the
engine's defaults filled in) and `erq submit` (absent unless given, so the service's defaults apply)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from erq_core.config import FieldSpec, describe_bounds


def add_config_options(parser: Any, specs: list[FieldSpec], *, with_defaults: bool) -> None:
    """One option per field: its flags, help with bounds, choices and switches. With `with_defaults`
    an omitted option takes the field's default; without, it is left out of the parsed namespace."""
    for spec in specs:
        parser.add_argument(*_flags(spec), **_option_kwargs(spec, with_defaults))


def _flags(spec: FieldSpec) -> tuple[str, ...]:
    option = spec.option
    if spec.base_type is bool and option.negative_flag:
        return (option.negative_flag,)
    return option.flags or (f"--{spec.name.replace('_', '-')}",)


def _option_kwargs(spec: FieldSpec, with_defaults: bool) -> dict[str, Any]:
    option = spec.option
    kwargs: dict[str, Any] = {"dest": spec.name}
    if not with_defaults:
        kwargs["default"] = argparse.SUPPRESS
    if spec.base_type is bool:
        negative = bool(option.negative_flag)
        kwargs.update(action="store_false" if negative else "store_true",
                      help=f"turn off: {option.help}" if negative else option.help)
        return kwargs
    bounds = "" if spec.base_type is str else f" ({describe_bounds(spec)})"
    kwargs["help"] = option.help + bounds + (_default_text(spec) if with_defaults else "")
    if option.choices is not None:
        kwargs["choices"] = option.choices
    if spec.is_sequence:
        kwargs["action"] = "append"
        if with_defaults:
            kwargs["default"] = None
    else:
        kwargs["type"] = spec.base_type
        if with_defaults:
            kwargs["default"] = None if spec.default is dataclasses.MISSING else spec.default
    if option.required:
        kwargs["required"] = True
    return kwargs


def _default_text(spec: FieldSpec) -> str:
    return "" if spec.default in (None, (), dataclasses.MISSING) else f"; default {spec.default}"
