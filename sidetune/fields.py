"""Config fields that carry their own documentation: `opt(default, "one line of meaning")`.

The help text lives with the field, so `sidetune train --help-config` can list every key with its type, default and
meaning, and no comment drifts away from the code it describes.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

_NO_DEFAULT: Any = dataclasses.MISSING


def opt(default: Any = _NO_DEFAULT, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a default (or a default factory) and a one-line help text."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_docs(cls: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for each field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hints[f.name]), _yaml(default), f.metadata.get("help", "")))
    return rows


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(hint, "__name__", str(hint))


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) and not value else str(value)


def check_positive(key: str, value: float, minimum: float = 1) -> None:
    """One line for a count or size below its minimum."""
    from sidetune.errors import SidetuneError

    if value < minimum:
        raise SidetuneError(f"{key} must be >= {minimum}, got {value}")


def check_dropout(key: str, value: float) -> None:
    """One line for a dropout probability outside [0, 1)."""
    from sidetune.errors import SidetuneError

    if not 0 <= value < 1:
        raise SidetuneError(f"{key} must be in [0, 1), got {value}")


def check_targets(key: str, targets: list[str] | None) -> None:
    """Target lists (names, "re:<regex>", "all-linear"): not empty, every regex compiles."""
    import re

    from sidetune.errors import SidetuneError, one_line

    if targets is None:
        return
    if not targets:
        raise SidetuneError(f"{key} is an empty list; name at least one layer (or use all-linear)")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise SidetuneError(f"{key}: {t!r} is not a valid regular expression ({one_line(e)})") from None


def describe(sections: dict[str, type]) -> str:
    """Every key of the given config sections with its type, default and help, as `sidetune train --help-config`
    prints it."""
    lines = []
    for section, cls in sections.items():
        lines.append(f"{section}:" + (f"  ({cls.__doc__.strip().splitlines()[0]})" if cls.__doc__ and
                                      not cls.__doc__.startswith(cls.__name__ + "(") else ""))
        for key, typ, default, help_ in field_docs(cls):
            lines.append(f"  {section.split(' ')[0]}.{key}: {typ} = {default}")
            if help_:
                lines.append(f"      {help_}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
