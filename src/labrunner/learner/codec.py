"""Plain data crosses by value: what is copied (scalars, containers of them, the field's
value types such as paths, decimals, JSON wrappers and SQL compositions) and how."""

from __future__ import annotations

import datetime
import decimal
import sys
import uuid
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from rpyc.core import netref

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_PLAIN_MARK = "\x00labrunner-plain\x00"
_MAX_PLAIN_ITEMS = 200_000


def _encode_plain(obj: Any, budget: list[int], depth: int = 0) -> Any:
    """``obj`` as nested tuples brine can carry, or raise ValueError if it is not plain."""
    kind = type(obj)
    if kind in _PLAIN_SCALARS:
        return obj
    if issubclass(kind, netref.BaseNetref):
        # Never look into a proxy here: any question to it is a request to the other side,
        # made while this side is composing a message.
        raise ValueError("a proxy is not plain data")
    budget[0] -= 1
    if depth > 60 or budget[0] < 0:
        raise ValueError("too deep or too big to copy")
    if kind is tuple:
        return (_PLAIN_MARK, "t", tuple(_encode_plain(x, budget, depth + 1) for x in obj))
    if kind is list:
        return (_PLAIN_MARK, "l", tuple(_encode_plain(x, budget, depth + 1) for x in obj))
    if kind is dict:
        return (_PLAIN_MARK, "d", tuple(
            (_encode_plain(k, budget, depth + 1), _encode_plain(v, budget, depth + 1))
            for k, v in obj.items()))
    if kind is set or kind is frozenset:
        return (_PLAIN_MARK, "s" if kind is set else "f",
                tuple(_encode_plain(x, budget, depth + 1) for x in obj))
    value = _encode_value(obj, lambda x: _encode_plain(x, budget, depth + 1))
    if value is None:
        raise ValueError("not plain data")
    return (_PLAIN_MARK, value[0], value[1:])


def _encode_value(obj: Any, inner: Any) -> tuple[Any, ...] | None:
    """Value types the field passes around as data (query parameters, paths, JSON
    wrappers, SQL compositions): copied, so each side gets one its own libraries accept."""
    kind = type(obj)
    if issubclass(kind, PurePath):
        return ("path", str(obj), isinstance(obj, Path))
    if kind in (datetime.datetime, datetime.date, datetime.time, datetime.timedelta):
        return ("dt", kind.__name__, tuple(inner(a) for a in obj.__reduce__()[1]))
    if kind is datetime.timezone:
        return ("tz", tuple(inner(a) for a in obj.__getinitargs__()))
    if kind.__module__ == "zoneinfo" and kind.__name__ == "ZoneInfo":
        return ("zi", str(obj.key))
    if kind is decimal.Decimal:
        return ("dec", str(obj))
    if kind is uuid.UUID:
        return ("uuid", obj.hex)
    if kind is bytearray or kind is memoryview:
        return ("bytes", bytes(obj))
    if kind.__module__ == "psycopg.types.json" and kind.__name__ in ("Json", "Jsonb"):
        if getattr(obj, "dumps", None) is not None:
            return None
        return ("json", kind.__name__, inner(obj.obj))
    if kind.__module__ == "psycopg.sql":
        return _encode_sql(obj, inner)
    message = sys.modules.get("google.protobuf.message")
    if message is not None and isinstance(obj, message.Message):
        # gRPC serialises with the message class of its own process: send the bytes.
        return ("pb", obj.DESCRIPTOR.full_name, obj.SerializeToString())
    if callable(obj) and getattr(obj, "__module__", None) == "psycopg.rows" and getattr(
            obj, "__name__", "") in _ROW_FACTORIES:
        return ("rows", obj.__name__)
    return None


_ROW_FACTORIES = ("tuple_row", "dict_row", "namedtuple_row", "scalar_row")


def _encode_sql(obj: Any, inner: Any) -> tuple[Any, ...] | None:
    name = type(obj).__name__
    payload = obj._obj
    if name == "SQL":
        return ("sql", "SQL", str(payload))
    if name == "Identifier":
        return ("sql", "Identifier", tuple(str(p) for p in payload))
    if name == "Literal":
        return ("sql", "Literal", inner(payload))
    if name == "Placeholder":
        return ("sql", "Placeholder", str(payload), str(obj._format.value))
    if name == "Composed":
        parts = []
        for part in payload:
            encoded = _encode_sql(part, inner)
            if encoded is None:
                return None
            parts.append((_PLAIN_MARK, encoded[0], encoded[1:]))
        return ("sql", "Composed", tuple(parts))
    return None


def _decode_value(tag: str, items: tuple[Any, ...]) -> Any:
    if tag == "path":
        return Path(items[0]) if items[1] else PurePosixPath(items[0])
    if tag == "dt":
        kinds = {"datetime": datetime.datetime, "date": datetime.date,
                 "time": datetime.time, "timedelta": datetime.timedelta}
        return kinds[items[0]](*[_decode_plain(a) for a in items[1]])
    if tag == "tz":
        return datetime.timezone(*[_decode_plain(a) for a in items[0]])
    if tag == "zi":
        import zoneinfo

        return zoneinfo.ZoneInfo(items[0])
    if tag == "dec":
        return decimal.Decimal(items[0])
    if tag == "uuid":
        return uuid.UUID(hex=items[0])
    if tag == "bytes":
        return bytearray(items[0])
    if tag == "json":
        from psycopg.types import json as pg_json

        return getattr(pg_json, "Jsonb" if items[0] == "Jsonb" else "Json")(
            _decode_plain(items[1]))
    if tag == "pb":
        from google.protobuf import message_factory
        from google.protobuf.descriptor_pool import Default

        descriptor = Default().FindMessageTypeByName(items[0])
        return message_factory.GetMessageClass(descriptor).FromString(items[1])
    if tag == "rows" and items[0] in _ROW_FACTORIES:
        from psycopg import rows

        return getattr(rows, items[0])
    if tag == "sql":
        from psycopg import sql

        kind, rest = items[0], items[1:]
        if kind == "SQL":
            return sql.SQL(rest[0])
        if kind == "Identifier":
            return sql.Identifier(*rest[0])
        if kind == "Literal":
            return sql.Literal(_decode_plain(rest[0]))
        if kind == "Placeholder":
            from psycopg.adapt import PyFormat

            return sql.Placeholder(rest[0], PyFormat(rest[1]))
        if kind == "Composed":
            return sql.Composed([_decode_plain(p) for p in rest[0]])
    raise ValueError(f"unknown value tag {tag!r}")


def _decode_plain(value: Any) -> Any:
    if type(value) is not tuple:
        return value
    if len(value) == 3 and value[0] == _PLAIN_MARK and type(value[2]) is tuple:
        kind, items = value[1], value[2]
        if kind == "d":
            return {_decode_plain(k): _decode_plain(v) for k, v in items}
        if kind in ("l", "s", "f", "t"):
            decoded = [_decode_plain(x) for x in items]
            if kind == "l":
                return decoded
            if kind == "s":
                return set(decoded)
            if kind == "f":
                return frozenset(decoded)
            return tuple(decoded)
        return _decode_value(str(kind), items)
    return tuple(_decode_plain(x) for x in value)
