"""The download endpoint's request parsing and naming, without sockets."""

from __future__ import annotations

import pytest

from vpsrelay import config, download, save
from vpsrelay.core.imageref import DEFAULT_PLATFORM, Platform
from vpsrelay.errors import ClientError, NameUnknown, TooManyRequests


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


def test_limits_count_downloads_per_client_and_bytes_held() -> None:
    limits = download.Limits(config.DownloadConfig(downloads_per_client=2, held_bytes=8 * 2**20))
    with limits.running_for("a"), limits.running_for("a"):
        with pytest.raises(TooManyRequests, match="at most 2 per client"):
            limits.running_for("a").__enter__()
        with limits.running_for("b"):
            assert limits.running == {"a": 2, "b": 1}
    assert limits.running == {}
    held, other = download.Held(limits), download.Held(limits)
    held.reserve(5 * 2**20)
    with pytest.raises(TooManyRequests, match="busy"):
        other.reserve(4 * 2**20)
    other.reserve(3 * 2**20)
    held.give_back(held.size)
    other.give_back(other.size)
    assert limits.held == 0
    unlimited = download.Limits(config.DownloadConfig(downloads_per_client=0, held_bytes=0))
    for _ in range(100):
        unlimited.running_for("a").__enter__()
    download.Held(unlimited).reserve(2**40)
