"""Records declared like dataclasses, without the dataclasses module.

The classes a short command loads (Config and its sections, Node, Image, ...) were dataclasses:
importing dataclasses pulls in inspect, ast, dis and tokenize (~8 ms) and each @dataclass compiles
its methods when its module is imported (~1 ms a class), on every `pxe-stage` start. A Record
subclass declares its fields the same way (annotations in order, class attributes as defaults,
``Factory(f)`` for a default made per instance) and gets the same constructor (its signature is
compiled on the first instance, not at import), ==, repr, hash when frozen; the module functions
``fields``, ``asdict`` and ``replace`` do what dataclasses' do for them.

    class Node(Record):                      # frozen (the default): assignment raises
        name: str
        ip: str | None = None
        _norepr = ("boot_token",)            # fields left out of repr (credentials)

    class Report(Record, frozen=False): ...  # fields assignable, unhashable (compared by value)

Class attributes stay readable as defaults (``Boot.http_port``); instances keep a ``__dict__``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's (~2 ms on every start)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class Factory:
    """A default made anew for each instance (dataclasses' ``field(default_factory=...)``)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make

    def __repr__(self) -> str:
        return f"Factory({self.make!r})"


_MISSING = object()


class Record:
    """The base: see the module's docstring."""

    _fields: tuple[str, ...] = ()
    _norepr: tuple[str, ...] = ()
    _frozen = True

    def __init_subclass__(cls, frozen: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(name for name in cls.__dict__.get("__annotations__", {})
                    if not name.startswith("_"))
        cls._fields = tuple(f for f in cls._fields if f not in own) + own
        if frozen is not None:
            cls._frozen = frozen
        if "__init__" not in cls.__dict__:
            cls.__init__ = Record.__init__  # type: ignore[method-assign]  # compiled on first use
        if not cls._frozen:
            cls.__hash__ = None  # type: ignore[assignment]  # mutable: compared by value only
        else:
            cls.__hash__ = Record.__hash__  # type: ignore[method-assign]
        defaults = [name for name in cls._fields if name in _defaults_of(cls)]
        if defaults:  # as dataclasses: no field without a default after one with a default
            first = cls._fields.index(defaults[0])
            bare = [name for name in cls._fields[first:] if name not in defaults]
            if bare:
                raise TypeError(f"{cls.__name__}: field {bare[0]!r} without a default follows "
                                f"{defaults[0]!r} with one")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        init = _compile_init(cls)
        cls.__init__ = init  # type: ignore[method-assign]
        init(self, *args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise AttributeError(f"cannot delete field {name!r}")
        object.__delattr__(self, name)

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(" + ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self._fields
            if name not in self._norepr) + ")"

    def __reduce__(self) -> tuple:  # copy and pickle build it again through __init__
        return (type(self), self._values())


def _defaults_of(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            if name in klass.__dict__:
                out[name] = klass.__dict__[name]
    return out


def _compile_init(cls: type[Record]) -> Callable[..., None]:
    """``__init__(self, a, b=<default>, ...)`` of ``cls``'s fields: a real signature (Python's own
    errors for a missing or unknown argument) and one store into ``__dict__``."""
    defaults = _defaults_of(cls)
    params, body, namespace = [], [], {"_MISSING": _MISSING}
    for name in cls._fields:
        if name not in defaults:
            params.append(name)
        elif isinstance(defaults[name], Factory):
            namespace[f"_factory_{name}"] = defaults[name].make
            params.append(f"{name}=_MISSING")
            body.append(f"    if {name} is _MISSING: {name} = _factory_{name}()")
        else:
            namespace[f"_default_{name}"] = defaults[name]
            params.append(f"{name}=_default_{name}")
    pairs = ", ".join(f"{name!r}: {name}" for name in cls._fields)
    body.append(f"    self.__dict__.update({{{pairs}}})")  # past __setattr__ (frozen or not)
    source = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass")
    exec(source, namespace)  # noqa: S102 - our own field names (identifiers), as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def fields(record: Record | type[Record]) -> tuple[str, ...]:
    """The field names, in declaration order (dataclasses.fields(...) names)."""
    return record._fields


def asdict(record: Record) -> dict[str, Any]:
    """The fields as a dict; records inside (also in lists, tuples, dicts) become dicts too."""
    return {name: _plain(getattr(record, name)) for name in record._fields}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def replace(record: Record, **changes: Any) -> Any:
    """A copy of ``record`` with ``changes`` (unknown field names are a TypeError)."""
    unknown = sorted(set(changes) - set(record._fields))
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field {unknown[0]!r}")
    return type(record)(**{name: changes.get(name, getattr(record, name))
                           for name in record._fields})
