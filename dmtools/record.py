"""Value classes for the copy command's start-up path, without the ``dataclasses`` module.

``@record`` (or ``@record(frozen=True)``) gives a class whose annotated attributes are its fields,
as ``@dataclass`` does for the parts this project uses: an ``__init__`` taking the fields in
order, by position or keyword, with the class's defaults, then calling ``__post_init__`` when the
class has one; ``__repr__``; ``__eq__`` between instances of the same class; ``__match_args__``;
and for ``frozen=True`` assignment refused (:class:`FrozenInstanceError`) and ``__hash__`` from the
fields (a mutable record is unhashable, as a mutable dataclass). Fields with ``ClassVar`` or
``field()`` options are not supported.

Why: importing ``dataclasses`` (which imports ``inspect``, ``ast``, ``dis``, ``tokenize``) costs
42 M instructions (``valgrind --tool=callgrind``; ``python -c pass`` is 88 M), and every copy paid
it: without it, ``python -m kcopyd`` copying a 1 MiB NBD export to a file went from 266.7 M to
211.8 M instructions.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Callable, TypeVar, dataclass_transform, overload

    _T = TypeVar("_T", bound=type)
else:  # typing's decorators only tell type checkers something: at run time they change nothing here
    def overload(func: object) -> object:
        return func

    def dataclass_transform(**_kwargs: object) -> object:
        return lambda func: func


__all__ = ["record", "FrozenInstanceError"]


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


def _fields(cls: type) -> tuple[tuple[str, ...], dict[str, Any]]:
    names = tuple(cls.__dict__.get("__annotations__", {}))
    return names, {n: cls.__dict__[n] for n in names if n in cls.__dict__}


def _build(cls: _T, frozen: bool) -> _T:
    names, defaults = _fields(cls)
    qualname = cls.__qualname__

    nfields = len(names)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs and len(args) == nfields:  # every field by position: the common call, fast
            self.__dict__.update(zip(names, args))
        else:
            _fill(self, args, kwargs)
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def _fill(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) > len(names):
            raise TypeError(f"{qualname}() takes {len(names)} arguments but {len(args)} were given")
        values = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{qualname}() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{qualname}() got multiple values for argument {key!r}")
            values[key] = value
        for name in names:
            if name in values:
                object.__setattr__(self, name, values[name])
            elif name in defaults:
                object.__setattr__(self, name, defaults[name])
            else:
                raise TypeError(f"{qualname}() missing required argument {name!r}")

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{qualname}({inner})"

    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in names)

    cls.__init__ = __init__  # type: ignore[misc]
    cls.__repr__ = __repr__  # type: ignore[assignment, method-assign]
    cls.__eq__ = __eq__  # type: ignore[assignment, method-assign]
    setattr(cls, "__match_args__", names)
    if frozen:
        def __setattr__(self: Any, name: str, value: Any) -> None:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")

        def __delattr__(self: Any, name: str) -> None:
            raise FrozenInstanceError(f"cannot delete field {name!r}")

        def __hash__(self: Any) -> int:
            return hash(tuple(getattr(self, n) for n in names))

        cls.__setattr__ = __setattr__  # type: ignore[assignment, method-assign]
        cls.__delattr__ = __delattr__  # type: ignore[assignment, method-assign]
        cls.__hash__ = __hash__  # type: ignore[assignment, method-assign]
    else:
        cls.__hash__ = None  # type: ignore[assignment]
    return cls


@overload
def record(cls: _T, /) -> _T: ...
@overload
def record(*, frozen: bool = False) -> Callable[[_T], _T]: ...


@dataclass_transform()
def record(cls: Any = None, /, *, frozen: bool = False) -> Any:
    """Make ``cls`` a value class of its annotated fields (see the module's docstring)."""
    if cls is None:
        return lambda c: _build(c, frozen)
    return _build(cls, frozen)
