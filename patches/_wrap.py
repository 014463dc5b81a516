"""The one way a patch replaces a vLLM function: `wrap(owner, name, make_replacement)`.

`make_replacement(original)` returns the new function, which calls `original` (or not) itself.
`wrap` installs it once per owner (a second call is a no-op), keeps the original reachable
(`original_of`), and keeps a staticmethod a staticmethod and a classmethod a classmethod: the
replacement has the signature of the underlying function (`cls` first for a classmethod, no
`self` for a staticmethod). It works on classes and on modules alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ORIGINAL = "__vispec_original__"


def _resolve(owner: Any, name: str) -> Any:
    """The attribute as stored (descriptors not bound), from the owner's own dict or, for a class, its bases."""
    for namespace in getattr(owner, "__mro__", (owner,)):
        if name in vars(namespace):
            return vars(namespace)[name]
    raise AttributeError(f"{owner!r} has no attribute {name!r} to patch")


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
    stored = _resolve(owner, name)
    descriptor = type(stored) if isinstance(stored, (staticmethod, classmethod)) else None
    original = stored.__func__ if descriptor is not None else stored
    replacement = make_replacement(original)
    setattr(replacement, _ORIGINAL, original)
    setattr(owner, name, descriptor(replacement) if descriptor is not None else replacement)
    return replacement
