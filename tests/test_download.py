"""The download endpoint's request parsing and naming, without sockets."""

from __future__ import annotations

import pytest

from vpsrelay import config, download, save
from vpsrelay.core.imageref import DEFAULT_PLATFORM, Platform
from vpsrelay.errors import ClientError, NameUnknown


def test_parse_request_path_and_query() -> None:
    request = download.parse_request("/download/alpine:3", "platform=linux/arm64/v8", 8)
    assert [r.name for r in request.refs] == ["alpine"]
    assert request.platform == Platform("linux", "arm64", "v8")
    assert request.platform_given
    both = download.parse_request("/download", "image=alpine&image=ghcr.io/o/app%3A1&x=y", 8)
    assert [(r.name, r.tag) for r in both.refs] == [("alpine", "latest"), ("ghcr.io/o/app", "1")]
    assert both.platform == DEFAULT_PLATFORM
    assert not both.platform_given


@pytest.mark.parametrize(
    ("path", "query"),
    [("/download", ""), ("/download/", "image="), ("/download", "image=a&image=b&image=c")],
)
def test_parse_request_refuses(path: str, query: str) -> None:
    with pytest.raises(ClientError):
        download.parse_request(path, query, 2)


def test_repo_names_are_the_registrys_own() -> None:
    settings = config.Settings()
    assert download.repo_name(settings, "alpine", "") == "alpine"
    assert download.repo_name(settings, "library/alpine", "") == "alpine"
    assert download.repo_name(settings, "someuser/tool", "") == "someuser/tool"
    assert download.repo_name(settings, "ghcr/owner/app", "") == "ghcr.io/owner/app"
    assert download.repo_name(settings, "docker.io/library/x", "") == "x"
    with pytest.raises(NameUnknown):
        download.repo_name(settings, "evil.example.com/x", "")


def test_save_url() -> None:
    url = save.download_url(
        "https://relay.example.com/", ["alpine:3", "a/b@sha256:x"], "linux/arm64"
    )
    assert url == (
        "https://relay.example.com/download?image=alpine%3A3&image=a%2Fb%40sha256%3Ax"
        "&platform=linux%2Farm64"
    )
