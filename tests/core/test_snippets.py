from __future__ import annotations

import json
import tomllib

import pytest

from vpsrelay.core import snippets
from vpsrelay.core.snippets import Target

HTTPS = Target("https://relay.example.com", ("docker.io", "ghcr.io"))
HTTP = Target("http://10.1.2.3:5000", login_required=True)


def by_key(target: Target) -> dict[str, snippets.Snippet]:
    return {s.key: s for s in snippets.snippets(target)}


def test_every_format_is_there_in_order():
    formats = [s.format for s in snippets.snippets(HTTPS)]
    assert sorted(set(formats), key=formats.index) == list(snippets.FORMATS)


def test_daemon_json_names_the_relay():
    assert json.loads(by_key(HTTPS)["daemon-json"].text) == {
        "registry-mirrors": ["https://relay.example.com"]
    }
    assert json.loads(by_key(HTTP)["daemon-json"].text) == {
        "registry-mirrors": ["http://10.1.2.3:5000"],
        "insecure-registries": ["10.1.2.3:5000"],
    }


@pytest.mark.parametrize("key", ["containerd-hub", "containerd-default", "containerd-config",
                                 "podman-registries"])  # fmt: skip
@pytest.mark.parametrize("target", [HTTPS, HTTP])
def test_toml_snippets_parse(key, target):
    tomllib.loads(by_key(target)[key].text)


def test_containerd_hosts():
    hub = tomllib.loads(by_key(HTTPS)["containerd-hub"].text)
    assert hub["server"] == "https://registry-1.docker.io"
    assert hub["host"]["https://relay.example.com"]["capabilities"] == ["pull", "resolve"]
    default = tomllib.loads(by_key(HTTP)["containerd-default"].text)
    assert default["host"]["http://10.1.2.3:5000"]["skip_verify"] is True


def test_podman_mirror():
    conf = tomllib.loads(by_key(HTTP)["podman-registries"].text)
    assert conf["registry"][0]["mirror"] == [{"location": "10.1.2.3:5000", "insecure": True}]


def test_k3s_lists_every_registry():
    text = by_key(HTTPS)["k3s-registries"].text
    assert '"docker.io":' in text
    assert '"ghcr.io":' in text
    assert "configs:" not in text
    login = by_key(HTTP)["k3s-registries"].text
    assert "username:" in login
    assert "insecure_skip_verify: true" in login


def test_login_step_when_access_control_is_on():
    assert "docker login 10.1.2.3:5000" in by_key(HTTP)["docker-pull"].text
    assert "docker login" not in by_key(HTTPS)["docker-pull"].text
    assert "podman login" in by_key(HTTP)["podman-pull"].text
    assert "Login information" in by_key(HTTP)["nas-synology"].text


def test_as_text_has_headings():
    text = snippets.as_text(snippets.snippets(HTTPS, ("docker",)))
    assert text.startswith(
        "# --- dockerd: make the relay Docker Hub's mirror (/etc/docker/daemon.json)"
    )


def test_unknown_format():
    with pytest.raises(KeyError):
        snippets.snippets(HTTPS, ("helm",))


def test_k3s_login_over_https_has_no_tls_block():
    text = by_key(Target("https://relay.example.com", login_required=True))["k3s-registries"].text
    assert "username:" in text
    assert "tls:" not in text
