"""The bucket's signatures (botocore through `vpsrelay.cache.s3.signing`) against the
examples of the S3 API reference: same keys, dates and answers, so the adapter hands
botocore the right method, URL, headers, payload hash, region and expiry."""

from __future__ import annotations

import datetime
import logging
from urllib.parse import parse_qsl, urlsplit

import botocore.auth
import pytest

from vpsrelay.cache.s3.signing import MAX_PRESIGN_SECONDS, Signer, wire_url
from vpsrelay.config import Secret
from vpsrelay.ops import logs

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SIGNER = Signer("AKIAIOSFODNN7EXAMPLE", Secret(SECRET), "us-east-1")
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.fixture(autouse=True)
def documented_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore reads the clock itself; the examples are signed at 2013-05-24 00:00 UTC."""

    def when(remove_tzinfo: bool = True) -> datetime.datetime:
        moment = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
        return moment.replace(tzinfo=None) if remove_tzinfo else moment

    monkeypatch.setattr(botocore.auth, "get_current_datetime", when)


def test_get_object_example() -> None:
    # "Example: GET Object" (Authorization header, single chunk)
    url, headers = SIGNER.sign(
        "GET", "https://examplebucket.s3.amazonaws.com/test.txt", {"Range": "bytes=0-9"}
    )
    assert url == "https://examplebucket.s3.amazonaws.com/test.txt"
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["x-amz-content-sha256"] == EMPTY_SHA256
    assert headers["x-amz-date"] == "20130524T000000Z"
    assert headers["range"] == "bytes=0-9"


def test_a_body_is_signed_by_its_hash() -> None:
    # "Example: PUT Object": the payload's SHA-256 goes into the header and the signature
    url, headers = SIGNER.sign(
        "PUT",
        "https://examplebucket.s3.amazonaws.com/test$file.text",
        {"x-amz-storage-class": "REDUCED_REDUNDANCY"},
        b"Welcome to Amazon S3.",
    )
    assert url == "https://examplebucket.s3.amazonaws.com/test%24file.text"
    assert headers["x-amz-content-sha256"] == (
        "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    )
    assert (
        "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"
        in headers["authorization"]
    )
    _, other = SIGNER.sign(
        "PUT",
        "https://examplebucket.s3.amazonaws.com/test$file.text",
        {"x-amz-storage-class": "REDUCED_REDUNDANCY"},
        b"Welcome to Amazon S3!",
    )
    assert other["authorization"] != headers["authorization"]


def test_presigned_url_example() -> None:
    # "Example: a presigned URL" (query parameters)
    url = SIGNER.presign_get("https://examplebucket.s3.amazonaws.com/test.txt", 86400)
    assert url == (
        "https://examplebucket.s3.amazonaws.com/test.txt"
        "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )
    assert SECRET not in url


def test_list_query_is_signed_sorted_and_encoded() -> None:
    # "Example: GET Bucket Lifecycle" / "List Objects": the query is part of the signature
    url, headers = SIGNER.sign("GET", "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J")
    assert url == "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J"
    assert headers["authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )
    # the order in which the query is given does not change the signature
    _, reordered = SIGNER.sign("GET", "https://examplebucket.s3.amazonaws.com/?prefix=J&max-keys=2")
    assert reordered["authorization"] == headers["authorization"]


def test_presign_expiry_bounds_and_secret_never_printed() -> None:
    with pytest.raises(ValueError, match="expiry"):
        SIGNER.presign_get("https://b.example/k", 0)
    with pytest.raises(ValueError, match="expiry"):
        SIGNER.presign_get("https://b.example/k", MAX_PRESIGN_SECONDS + 1)
    assert SIGNER.presign_get("https://b.example/k", MAX_PRESIGN_SECONDS)
    assert SECRET not in repr(SIGNER)
    assert SECRET not in str(SIGNER)


def test_paths_and_query_values_are_encoded_once() -> None:
    url = SIGNER.presign_get("https://b.example/bucket/a b/c~d", 60)
    assert url.startswith("https://b.example/bucket/a%20b/c~d?")
    sent, headers = SIGNER.sign("POST", "https://b.example/bucket/k?uploads=", {}, b"")
    assert sent == "https://b.example/bucket/k?uploads="
    assert headers["x-amz-content-sha256"] == EMPTY_SHA256
    # given encoded or not, a value is sent (and signed) encoded once
    assert wire_url("http://h/b?prefix=relay/blobs/&uploadId=a%2Fb+c") == (
        "http://h/b?prefix=relay%2Fblobs%2F&uploadId=a%2Fb%2Bc"
    )
    assert wire_url("http://h/b?uploads") == "http://h/b?uploads="
    assert dict(parse_qsl(urlsplit(wire_url("http://h/?a=%41&b=x y")).query)) == {
        "a": "A",
        "b": "x y",
    }


def test_signatures_never_reach_the_log_even_at_debug() -> None:
    """botocore logs canonical requests and signatures at DEBUG, and a presigned URL's
    signature is its credential: the relay's logging keeps botocore at INFO or above."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.name} {record.getMessage()}")

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("botocore").level)
    try:
        logs.setup("debug")  # replaces the root's handlers: ours goes on after it
        root.addHandler(Keep())
        logging.getLogger("vpsrelay.cache").debug("debug reaches the log")
        url = SIGNER.presign_get("https://b.example/k", 60)
        _, headers = SIGNER.sign("GET", "https://b.example/k")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("botocore").setLevel(saved[2])
    text = "\n".join(lines)
    assert "debug reaches the log" in text
    assert url.rpartition("=")[2] not in text
    assert headers["authorization"].rpartition("=")[2] not in text
    assert "botocore" not in text
