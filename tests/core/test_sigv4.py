"""SigV4 against the examples of the S3 API reference (same keys, dates and answers)."""

from __future__ import annotations

import datetime

import pytest

from vpsrelay.core import sigv4

CREDS = sigv4.Credentials(
    "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"
)
WHEN = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)


def test_get_object_example() -> None:
    # "Example: GET Object" (Authorization header, single chunk)
    headers = sigv4.sign_headers(
        CREDS,
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9"},
        sigv4.EMPTY_SHA256,
        WHEN,
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_presigned_url_example() -> None:
    # "Example: a presigned URL" (query parameters)
    url = sigv4.presign_get(CREDS, "https://examplebucket.s3.amazonaws.com/test.txt", 86400, WHEN)
    assert url.endswith(
        "X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )
    assert "X-Amz-SignedHeaders=host" in url
    assert CREDS.secret_key not in url


def test_list_query_is_signed_sorted_and_encoded() -> None:
    # "Example: GET Bucket Lifecycle" / "List Objects": the query is part of the signature
    headers = sigv4.sign_headers(
        CREDS,
        "GET",
        "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J",
        {},
        sigv4.EMPTY_SHA256,
        WHEN,
    )
    assert headers["authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


def test_presign_expiry_bounds_and_secret_never_printed() -> None:
    with pytest.raises(ValueError, match="expiry"):
        sigv4.presign_get(CREDS, "https://b.example/k", 0, WHEN)
    with pytest.raises(ValueError, match="expiry"):
        sigv4.presign_get(CREDS, "https://b.example/k", sigv4.MAX_PRESIGN_SECONDS + 1, WHEN)
    assert CREDS.secret_key not in repr(CREDS)


def test_paths_and_query_values_are_encoded_once() -> None:
    url = sigv4.presign_get(CREDS, "https://b.example/bucket/a b/c~d", 60, WHEN)
    assert url.startswith("https://b.example/bucket/a%20b/c~d?")
    headers = sigv4.sign_headers(
        CREDS, "POST", "https://b.example/bucket/k?uploads=", {}, sigv4.UNSIGNED, WHEN
    )
    assert headers["x-amz-content-sha256"] == sigv4.UNSIGNED
