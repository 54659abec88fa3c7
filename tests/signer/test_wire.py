"""The protocol's JSON lines, read and written without the `json` package's Python layer
(signer/wire.py): the same bytes as json.dumps, the same values as json.loads."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signer import wire

_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=30)
_flat = st.dictionaries(st.text(max_size=10), _scalar, max_size=6)
_nested = st.recursive(_scalar | st.floats(allow_nan=False, allow_infinity=False),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@settings(max_examples=500, deadline=None)
@given(_flat | st.dictionaries(st.text(max_size=5), _nested, max_size=4))
def test_a_line_is_what_json_dumps_writes(obj: dict[str, Any]) -> None:
    assert wire.line(obj) == json.dumps(obj, ensure_ascii=True,
                                        separators=(",", ":")).encode() + b"\n"
    assert wire.loads(wire.line(obj)) == obj


def _json_loads(data: bytes) -> object:
    def refuse(name: str) -> object:
        raise ValueError(name)
    return json.loads(data.decode("utf-8"), parse_constant=refuse)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('{}[]":,. \t\n\r0123456789-+eEtrufalsn\\x'
                                             "NaIinity\u00e9")), max_size=30)
       .map(str.encode)
       | st.binary(max_size=30)
       | _nested.map(lambda v: json.dumps(v, indent=1).encode()))
def test_loads_reads_what_json_loads_reads(data: bytes) -> None:
    """Exactly one JSON value with optional whitespace around it; anything else (NaN and
    Infinity included: not JSON) is a ValueError."""
    try:
        want: object = _json_loads(data)
    except (ValueError, RecursionError):
        want = ValueError
    try:
        got: object = wire.loads(data)
    except ValueError:
        got = ValueError
    assert got == want


@pytest.mark.parametrize(("line", "why"), [
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"a": NaN}\n', "not JSON"),
    (b'{"a": 1} {"b": 2}\n', "not JSON"),
    (b'{"a": "\xff"}\n', "not JSON"),
    (b'{"a": 1}', "line too long or cut"),
    (b"", "connection closed"),
    (b"[" * 100_000 + b"\n", "line too long or cut"),
    (b"[" * 60_000 + b"\n", "not JSON"),
])
def test_a_bad_line_is_a_protocol_error(line: bytes, why: str) -> None:
    with pytest.raises(wire.ProtocolError, match=why):
        wire.read_line(io.BytesIO(line))
