"""What a failing bucket may put in the public `/readyz`: a status, a store's error code
of letters only, or the kind of failure; never text the store chose, a key or a digest."""

from __future__ import annotations

import httpx
import pytest

from vpsrelay.cache.s3.client import Answer, S3Client, S3Error
from vpsrelay.cache.s3.signing import Signer
from vpsrelay.registry_config import Secret

KEY = "relay/blobs/sha256/" + "ab" * 32


def _client() -> S3Client:
    return S3Client("http://127.0.0.1:9", "private-bucket", Signer("id", Secret("s"), "r"))


def _error(status: int, body: bytes) -> S3Error:
    return _client()._fail(f"GET {KEY}", Answer(status, httpx.Headers(), body))


@pytest.mark.parametrize(
    ("status", "body", "summary"),
    [
        (403, b"<Error><Code>AccessDenied</Code></Error>", "403 AccessDenied"),
        (503, b"<Error><Code>SlowDown</Code><Message>bucket x</Message></Error>", "503 SlowDown"),
        (500, b"<Error><Code>Internal\nError: private-bucket</Code></Error>", "500"),
        (500, b"<Error><Code>" + b"A" * 65 + b"</Code></Error>", "500"),
        (502, b"<html>gateway</html>", "502"),
        (404, b"not xml <", "404"),
        (400, b"", "400"),
    ],
)
def test_a_store_error_summary_is_a_status_and_a_plain_code(
    status: int, body: bytes, summary: str
) -> None:
    error = _error(status, body)
    assert error.summary == summary
    assert "\n" not in str(error)  # the log line: one line, the store's free text left out
    assert "private-bucket" not in str(error)
    assert KEY not in error.summary


def test_a_failure_without_an_answer_is_summed_up_by_its_kind() -> None:
    assert S3Error(f"GET {KEY}: ReadTimeout", reason="ReadTimeout").summary == "ReadTimeout"
    assert S3Error(f"GET {KEY}: ConnectError").summary == "ConnectError"
    assert S3Error(f"GET {KEY}: deadline").summary == "deadline"
    assert S3Error(f"HEAD {KEY}: no length").summary == "bad answer"
    assert S3Error(f"GET {KEY}: larger than 65536 bytes").summary == "bad answer"
    assert S3Error(KEY).summary == "bad answer"
    assert S3Error(f"GET {KEY}: 503", 503).summary == "503"
