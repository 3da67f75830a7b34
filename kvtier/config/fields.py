"""Layer 0: the value types of configuration keys, as pydantic types, and the base of
every section.

The loader parses environment variables as YAML scalars, so values arrive as YAML
types and are taken strictly: a key that wants an integer refuses ``"256"`` and
``true``, a flag refuses ``"yes"``. The few conversions kvtier does make are here:
sizes (``"4GiB"`` for every ``*_bytes`` key), tier / policy / codec names (any case),
lists from comma-separated strings, and numbers where a name is wanted (a numeric salt).
Pydantic's ValidationError becomes :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict,
                      ValidationError)
from pydantic.fields import FieldInfo

from kvtier.config.values import (CodecName, TierName, WritePolicy, enum_member, host_port,
                                  size_bytes)
from kvtier.errors import ConfigError


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):  # "memory,disk" (an environment variable) -> [memory, disk]
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _name(value: Any) -> Any:
    # YAML reads KVTIER_SALT=2024 as a number; it is still the name "2024".
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _distinct_tiers(tiers: list[TierName]) -> list[TierName]:
    if not tiers:
        raise ValueError("at least one tier is needed")
    if len(set(tiers)) != len(tiers):
        raise ValueError(f"a tier is listed twice: {[t.value for t in tiers]}")
    return tiers


def _address(value: str) -> str:
    host_port(value)
    return value


def http_url(url: str) -> str:
    """``url`` if empty or http(s); ValueError otherwise."""
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url


Int = Annotated[int, Strict()]
"""An integer (not a bool, float or string)."""
Number = Annotated[float, Strict()]
"""A float; an integer is taken as one."""
Flag = Annotated[bool, Strict()]
"""true or false only."""
Size = Annotated[int, Strict(), BeforeValidator(size_bytes)]
"""Bytes: an integer or a string such as ``"4KiB"``, ``"2 GB"``."""
Name = Annotated[str, Strict(), BeforeValidator(_name)]
"""A string; a number is taken as its text."""
Secret = Annotated[str, Strict()]
"""A string taken as it is (from the environment: not parsed as YAML). Declare the field
with ``repr=False``: that is what keeps its value out of reprs and error messages."""
Url = Annotated[str, Strict(), AfterValidator(http_url)]
"""An http:// or https:// URL, or "" (off)."""
Addresses = Annotated[list[Annotated[str, Strict(), AfterValidator(_address)]],
                     BeforeValidator(_comma_list)]
"""``"host:port"`` strings, or one comma-separated string of them."""
Tier = Annotated[TierName, BeforeValidator(lambda v: enum_member(TierName, v))]
"""A tier name, any case."""
Tiers = Annotated[list[Tier], BeforeValidator(_comma_list), AfterValidator(_distinct_tiers)]
"""Tier names, fastest first, each once; a list or one comma-separated string."""
Policy = Annotated[WritePolicy, BeforeValidator(lambda v: enum_member(WritePolicy, v))]
"""A write policy name, any case."""
Codec = Annotated[CodecName, BeforeValidator(lambda v: enum_member(CodecName, v))]
"""A codec name, any case."""


class Section(BaseModel):
    """A configuration section: unknown keys are errors; attributes may be set after
    construction without validation (the loader fills derived values, tests adjust)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False,
                              use_attribute_docstrings=True, protected_namespaces=(),
                              hide_input_in_errors=True)  # no secret in a ValidationError
    section_key: ClassVar[str] = ""
    """This section's dotted key prefix ("disk."; "" for the whole configuration)."""

    def __init__(self, **values: Any) -> None:
        """Keyword construction (``DiskConfig(path=...)``); a bad value is a ConfigError.
        Pydantic calls this for each section while validating a whole configuration too."""
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise config_error(e, type(self), self.section_key) from None


def secret_keys(model: type[BaseModel], prefix: str = "") -> frozenset[str]:
    """Dotted keys of the fields declared ``repr=False`` in ``model`` and its sections."""
    out: set[str] = set()
    for name, f in model.model_fields.items():
        sub = _section(f)
        if sub is not None:
            out |= secret_keys(sub, f"{prefix}{name}.")
        elif not f.repr:
            out.add(prefix + name)
    return frozenset(out)


def config_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> ConfigError:
    """The first problem of ``exc`` as a ConfigError naming its dotted key. A secret's
    value (or a whole mapping, which may hold one) is never shown."""
    err = exc.errors(include_url=False)[0]
    loc = err["loc"]
    key = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    parent, field = _walk(model, [p for p in loc if isinstance(p, str)])
    if err["type"] == "extra_forbidden":
        return ConfigError(key, f"unknown key (known: {', '.join(sorted(parent.model_fields))})")
    if err["type"] == "value_error":
        cause = err["ctx"]["error"]
        # A section's own __init__ (which pydantic calls while validating the whole)
        # has already named the key in full.
        return cause if isinstance(cause, ConfigError) else ConfigError(key, str(cause))
    words = _MESSAGES.get(err["type"])
    msg = words.format(**err.get("ctx", {})) if words else err["msg"][:1].lower() + err["msg"][1:]
    value = err.get("input")
    if field is not None and not field.repr or isinstance(value, (dict, BaseModel)):
        return ConfigError(key, f"{msg}, got a {type(value).__name__}")
    shown = repr(value)
    return ConfigError(key, f"{msg}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


# Pydantic's error types in the words kvtier used before it (tests and people grep them).
_MESSAGES = {"string_type": "expected a string", "int_type": "expected an integer",
             "int_from_float": "expected an integer", "float_type": "expected a number",
             "bool_type": "expected true or false", "list_type": "expected a list",
             "model_type": "expected a mapping", "dict_type": "expected a mapping",
             "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
             "less_than_equal": "must be <= {le}"}


def _section(f: FieldInfo) -> type[BaseModel] | None:
    t = f.annotation
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _walk(model: type[BaseModel], names: list[str]) -> tuple[type[BaseModel], FieldInfo | None]:
    """The section holding the last of ``names`` and that field (None if unknown)."""
    for i, name in enumerate(names):
        f = model.model_fields.get(name)
        if f is None or i == len(names) - 1:
            return model, f
        sub = _section(f)
        if sub is None:
            return model, f
        model = sub
    return model, None
