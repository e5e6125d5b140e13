"""The error tree: statuses, OCI codes and the registry JSON body."""

from __future__ import annotations

import json

import pytest

from vpsrelay import errors

ALL_ERRORS = [
    value
    for value in vars(errors).values()
    if isinstance(value, type) and issubclass(value, errors.RelayError)
]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.RelayError, 500, "UNKNOWN"),
        (errors.ConfigError, 500, "CONFIG"),
        (errors.ClientError, 400, "UNKNOWN"),
        (errors.NameInvalid, 400, "NAME_INVALID"),
        (errors.NameUnknown, 404, "NAME_UNKNOWN"),
        (errors.DigestInvalid, 400, "DIGEST_INVALID"),
        (errors.ManifestUnknown, 404, "MANIFEST_UNKNOWN"),
        (errors.TagInvalid, 400, "TAG_INVALID"),
        (errors.Unsupported, 405, "UNSUPPORTED"),
        (errors.NotFound, 404, "UNSUPPORTED"),
        (errors.RequestTooLarge, 413, "SIZE_INVALID"),
        (errors.UpstreamError, 502, "UNAVAILABLE"),
        (errors.UpstreamUnavailable, 502, "UNAVAILABLE"),
        (errors.UpstreamTimeout, 504, "UNAVAILABLE"),
        (errors.UpstreamProtocolError, 502, "UNAVAILABLE"),
        (errors.TokenRefused, 502, "UNAVAILABLE"),
        (errors.TooManyRedirects, 502, "UNAVAILABLE"),
        (errors.RedirectRefused, 502, "UNAVAILABLE"),
        (errors.DigestMismatch, 502, "DIGEST_INVALID"),
        (errors.BadRequest, 400, "UNSUPPORTED"),
        (errors.Unauthorized, 401, "UNAUTHORIZED"),
        (errors.Denied, 403, "DENIED"),
        (errors.TooManyRequests, 429, "TOOMANYREQUESTS"),
        (errors.MisdirectedRequest, 421, "DENIED"),
        (errors.ClientTooSlow, 408, "UNKNOWN"),
        (errors.HeadersTooLarge, 431, "SIZE_INVALID"),
    ],
)
def test_status_and_code(error, status, code):
    assert error.status == status
    assert error.code == code
    instance = error("boom")
    assert instance.status == status
    assert instance.code == code


def test_table_lists_every_error():
    assert len(ALL_ERRORS) == 26


@pytest.mark.parametrize("error", ALL_ERRORS)
def test_every_error_is_a_relay_error_and_an_exception(error):
    assert issubclass(error, errors.RelayError)
    assert issubclass(error, Exception)


@pytest.mark.parametrize(
    ("error", "base"),
    [
        (errors.NameInvalid, errors.ClientError),
        (errors.Unsupported, errors.ClientError),
        (errors.NotFound, errors.ClientError),
        (errors.UpstreamTimeout, errors.UpstreamError),
        (errors.UpstreamUnavailable, errors.UpstreamError),
        (errors.DigestMismatch, errors.UpstreamError),
        (errors.TooManyRedirects, errors.UpstreamError),
    ],
)
def test_hierarchy(error, base):
    assert issubclass(error, base)


def test_message_and_str():
    error = errors.NameInvalid("invalid repository name: 'X'")
    assert error.message == "invalid repository name: 'X'"
    assert str(error) == "invalid repository name: 'X'"
    assert error.detail is None


def test_registry_body_without_detail():
    body = json.loads(errors.Unsupported("read-only").to_registry_body())
    assert body == {"errors": [{"code": "UNSUPPORTED", "message": "read-only"}]}


@pytest.mark.parametrize("detail", [{"name": "x"}, ["a", 1], "text", 0, False])
def test_registry_body_with_detail(detail):
    body = json.loads(errors.DigestMismatch("bad", detail=detail).to_registry_body())
    assert body == {"errors": [{"code": "DIGEST_INVALID", "message": "bad", "detail": detail}]}


def test_registry_body_is_json_bytes_for_any_message():
    body = errors.RelayError('quote " backslash \\ newline \n ü').to_registry_body()
    assert isinstance(body, bytes)
    assert json.loads(body)["errors"][0]["message"] == 'quote " backslash \\ newline \n ü'


def test_reason_defaults_to_the_code_and_headers_to_none():
    error = errors.Denied("no")
    assert error.reason == "denied"
    assert error.headers == ()
    limited = errors.TooManyRequests(
        "slow down", reason="rate_limited", headers=(("retry-after", "3"),)
    )
    assert limited.reason == "rate_limited"
    assert limited.headers == (("retry-after", "3"),)
