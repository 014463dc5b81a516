"""The one way a patch replaces a vLLM function: `wrap(owner, name, make_replacement)`, and its record.

`make_replacement(original)` returns the new function, which calls `original` (or not) itself.
`wrap` installs it once per owner (a second call is a no-op), keeps the original reachable
(`original_of`), and keeps a staticmethod a staticmethod and a classmethod a classmethod: the
replacement has the signature of the underlying function (`cls` first for a classmethod, no
`self` for a staticmethod). It works on classes and on modules alike.

Every installation is recorded in `INSTALLED`, this process's patch inventory: which unit made it
(the module that defines `make_replacement`: `vispec_vllm.patches.<unit>`), on which owner, and the
symbol it replaced. The tests derive the idempotence check and the check that the index
(patches/__init__.py) names every replaced symbol from this record, so the inventory is written
once, by the `wrap` calls themselves.

A patch that cannot do its job raises `PatchError`, whose message names the unit: at start-up when
it cannot be installed, at its point of use when it finds itself not in effect.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_ORIGINAL = "__vispec_original__"
_PATCHES_PACKAGE = "vispec_vllm.patches."


class PatchError(RuntimeError):
    """A vispec-vllm patch cannot be installed, or is not in effect where vLLM uses the symbol."""

    def __init__(self, unit: str, problem: str) -> None:
        self.unit = unit.removeprefix(_PATCHES_PACKAGE)
        super().__init__(f"vispec-vllm patch {self.unit} (patches/{self.unit}.py, written against vLLM 0.32.0): "
                         f"{problem}")


@dataclass(frozen=True)
class Installed:
    """One replacement `wrap` installed."""

    unit: str  # the module that made it, e.g. "vispec_vllm.patches.serve_flags"
    owner: Any  # the class or module it was installed on
    name: str
    symbol: str  # what it replaced, dotted, e.g. "vllm.engine.arg_utils.EngineArgs.add_cli_args"
    descriptor: type | None  # staticmethod, classmethod, or None for a plain function
    replacement: Callable
    original: Callable

    @property
    def unit_name(self) -> str:
        """The unit as the index names it ("serve_flags" for patches/serve_flags.py)."""
        return self.unit.removeprefix(_PATCHES_PACKAGE)


# This process's patch inventory, in installation order (one entry per owner and name).
INSTALLED: list[Installed] = []


def _resolve(owner: Any, name: str) -> tuple[Any, Any]:
    """(namespace holding it, the attribute as stored, descriptors not bound): the owner's own dict or, for a
    class, its bases'."""
    for namespace in getattr(owner, "__mro__", (owner,)):
        if name in vars(namespace):
            return namespace, vars(namespace)[name]
    raise AttributeError(name)


def symbol_of(owner: Any, name: str, holder: Any) -> str:
    """The dotted name of what vLLM defines: the module's attribute, or the attribute of the class in the owner's
    MRO that holds it (the owner itself when that is a builtin: EagleProposer.__new__ is object's)."""
    if isinstance(owner, types.ModuleType):
        return f"{owner.__name__}.{name}"
    if holder.__module__ == "builtins":
        holder = owner
    return f"{holder.__module__}.{holder.__qualname__}.{name}"


def is_wrapped(owner: Any, name: str) -> bool:
    """True once `wrap` has replaced `owner.name` on `owner` itself."""
    stored = vars(owner).get(name)
    return hasattr(getattr(stored, "__func__", stored), _ORIGINAL)


def original_of(owner: Any, name: str) -> Callable:
    """The function `wrap` replaced (the underlying function of a static/class method)."""
    stored = vars(owner).get(name)
    function = getattr(stored, "__func__", stored)
    if not hasattr(function, _ORIGINAL):
        raise ValueError(f"{getattr(owner, '__qualname__', owner)!r}.{name} is not wrapped by vispec-vllm")
    return getattr(function, _ORIGINAL)


def wrap(owner: Any, name: str, make_replacement: Callable[[Callable], Callable]) -> Callable:
    """Replace `owner.name` by `make_replacement(original)`, once; returns the installed function."""
    if is_wrapped(owner, name):
        stored = vars(owner)[name]
        return getattr(stored, "__func__", stored)
    unit = make_replacement.__module__
    try:
        holder, stored = _resolve(owner, name)
    except AttributeError:
        raise PatchError(unit, f"{getattr(owner, '__qualname__', owner.__name__)} has no attribute {name!r} to "
                               "patch") from None
    descriptor = type(stored) if isinstance(stored, (staticmethod, classmethod)) else None
    original = stored.__func__ if descriptor is not None else stored
    replacement = make_replacement(original)
    setattr(replacement, _ORIGINAL, original)
    setattr(owner, name, descriptor(replacement) if descriptor is not None else replacement)
    INSTALLED.append(Installed(unit, owner, name, symbol_of(owner, name, holder), descriptor, replacement, original))
    return replacement
