from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import logline


def test_logfmt_quotes_only_what_needs_it():
    line = logline.logfmt(
        [("client", "127.0.0.1"), ("path", "/v2/x"), ("status", 200), ("user", None),
         ("ms", 1.25), ("disconnected", True), ("msg", 'say "hi"')]
    )  # fmt: skip
    assert (
        line
        == 'client=127.0.0.1 path="/v2/x" status=200 ms=1.2 disconnected=true msg="say \\"hi\\""'
    )


def test_json_keeps_nulls_and_order():
    assert logline.as_json([("b", 1), ("a", None)]) == '{"b":1,"a":null}'


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abc.def-ghi",
        "authorization: Basic YWxpY2U6c2VjcmV0",
        "url /token?password=hunter2&x=1",
        '{"token": "abcdef", "access_token":"qwerty"}',
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl",
        "refresh_token=r3fresh",
    ],
)
def test_redact_removes_credentials(text):
    redacted = logline.redact(text)
    for secret in ("abc.def-ghi", "YWxpY2U6c2VjcmV0", "hunter2", "abcdef", "qwerty",
                   "c2lnbmF0dXJl", "r3fresh"):  # fmt: skip
        assert secret not in redacted
    assert logline.REDACTED in redacted


def test_redact_leaves_ordinary_lines():
    line = 'client=127.0.0.1 method=GET path="/v2/library/alpine/manifests/latest" status=200'
    assert logline.redact(line) == line


@given(st.lists(st.tuples(st.text(min_size=1), st.one_of(st.none(), st.text(), st.integers()))))
def test_json_lines_parse(fields):
    parsed = json.loads(logline.as_json(fields))
    assert set(parsed) == {key for key, _ in fields}


@given(st.text())
def test_logfmt_value_is_one_token(text):
    rendered = logline.logfmt([("k", text)])
    assert "\n" not in rendered
    if " " in text or "=" in text or '"' in text:
        assert rendered.startswith('k="')
