"""Every reach into a library's internals is gated on its pinned version (or, for CPython,
on the hook being there), and pinned here by the source of what it relies on; the runtime
set is pinned by constraints.txt. What the relay does when a gate stays shut: a safety
reach stops it (unless `server.allow_unpatched`), the others degrade with a warning, and a
degraded relay says so in /readyz and `vpsrelay check`."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import ssl
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from hypercorn.protocol.h2 import H2Protocol
from packaging.requirements import Requirement

from tests.test_app import challenge_401, relay
from vpsrelay import cli, config, patches as library_patches
from vpsrelay.ops import check
from vpsrelay.patches import Degraded, httpcore as httpcore_patches, hypercorn as hypercorn_patches
from vpsrelay.tls import contexts as tls
from vpsrelay.upstream import netguard

REPO = Path(__file__).resolve().parents[1]

# sha256 of httpx 0.29.0's code that creates, uses and closes the `_pool` netguard replaces.
NETGUARD_SOURCES = {
    "AsyncHTTPTransport.__init__": (
        "9dece21fca85fba5cd38d7b321a56c7e293d64b41c012e49d01311aea75884b7"
    ),
    "AsyncHTTPTransport.handle_async_request": (
        "4dfd2e15d472a02f00c8033af74acb24d614bbb3f46a6fefb100e82cf4f7bd51"
    ),
    "AsyncHTTPTransport.aclose": (
        "cef6e5ca8a3e850162f4282a3bf1cb47e1a6b8fe035e48e9674aacea3845c3d3"
    ),
    "AsyncHTTPTransport.__aenter__": (
        "1fad06ceb5c70b3ec2fcb649d1d9466c759761b773865cbd94ec82e999c061f4"
    ),
    "AsyncHTTPTransport.__aexit__": (
        "895cd70762f1a39b9d919331368ab45275d3855ac50425310680bcf94a30e562"
    ),
}
# sha256 of CPython's `ssl.SSLContext._msg_callback` setter, per Python version: the hook
# must still call ours with (connection, direction, version, content type, type, data).
MSG_CALLBACK_SETTER = {
    (3, 11): "8255b7aed98f0ce566c6e0180c0369ffa38ce660d9a6d104d7775c7cccb4c658",
}


def settings(**overrides: object) -> config.Settings:
    return config.load(None, {}, overrides, upstreams={"docker.io": "http://hub.test"})


def fake_versions(monkeypatch: pytest.MonkeyPatch, **fake: str) -> None:
    real = library_patches.installed_version
    monkeypatch.setattr(
        library_patches, "installed_version", lambda name: fake.get(name) or real(name)
    )


# --- the pins


def test_pyproject_pins_every_library_whose_internals_are_reached() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    # By name and version, whatever extras a pin asks for (`httpx[socks]==0.29.0`).
    dependencies = {
        (req.name, str(req.specifier))
        for req in map(Requirement, project["project"]["dependencies"])
    }
    for pinned in (
        hypercorn_patches.PINNED,
        netguard.PINNED,
        httpcore_patches.PINNED,
    ):
        for name, version in pinned.items():
            assert (name, f"=={version}") in dependencies


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def test_constraints_are_the_installed_runtime_closure() -> None:
    """constraints.txt is what scripts/constraints.py prints for this environment: the
    runtime set the tests run with (scripts/test installs with it)."""
    spec = importlib.util.spec_from_file_location("constraints", REPO / "scripts/constraints.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.closure("vpsrelay") == _constraints()
    for pinned in (hypercorn_patches.PINNED, netguard.PINNED):
        for name, version in pinned.items():
            assert _constraints()[name] == version


def test_the_installs_use_the_constraints() -> None:
    for path in ("scripts/serve", "scripts/test", "Dockerfile"):
        assert "-c constraints.txt" in (REPO / path).read_text().replace("/src/", ""), path
    assert "!constraints.txt" in (REPO / ".dockerignore").read_text()


def test_httpx_pool_code_is_unchanged() -> None:
    functions = netguard.pinned_functions()
    assert set(functions) == set(NETGUARD_SOURCES)
    for name, function in functions.items():
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()  # type: ignore[arg-type]
        assert digest == NETGUARD_SOURCES[name], f"{name} changed in httpx: re-check netguard"
    source = inspect.getsource(httpx.AsyncHTTPTransport.handle_async_request)
    assert "await self._pool.handle_async_request(" in source


def test_the_client_hello_hook_is_unchanged() -> None:
    assert tls.client_hello_hook_available()
    hook = inspect.getattr_static(ssl.SSLContext, "_msg_callback")
    digest = hashlib.sha256(inspect.getsource(hook.fset).encode()).hexdigest()
    assert digest == MSG_CALLBACK_SETTER.get(sys.version_info[:2]), (
        "re-check tls.TLSState._on_message against this Python's ssl._msg_callback"
    )


# --- the gates


def test_the_pinned_versions_apply_everything() -> None:
    assert library_patches.apply_all(settings()) == ()
    assert H2Protocol._vpsrelay_patched  # type: ignore[attr-defined]


def test_version_problem_names_the_library_and_both_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_versions(monkeypatch, h2="9.9.9")
    assert library_patches.version_problem(hypercorn_patches.PINNED) == (
        "h2 9.9.9 is installed, vpsrelay needs h2==4.4.1"
    )
    assert library_patches.version_problem({"no-such-library": "1.0"}) == (
        "no-such-library not installed is installed, vpsrelay needs no-such-library==1.0"
    )


@pytest.mark.parametrize(("library", "reach"), [("hypercorn", "hypercorn"), ("httpx", "netguard")])
def test_a_safety_reach_that_cannot_apply_stops_the_relay(
    monkeypatch: pytest.MonkeyPatch, library: str, reach: str
) -> None:
    monkeypatch.setattr(H2Protocol, "_vpsrelay_patched", False)
    fake_versions(monkeypatch, **{library: "0.0.1"})
    with pytest.raises(hypercorn_patches.PatchError) as raised:
        library_patches.apply_all(settings())
    message = str(raised.value)
    assert message.startswith(f"{library} 0.0.1 is installed, vpsrelay needs {library}==")
    assert "--allow-unpatched" in message
    assert "\n" not in message
    assert not H2Protocol._vpsrelay_patched  # type: ignore[attr-defined]

    degraded = library_patches.apply_all(settings(**{"server.allow_unpatched": True}))
    assert [(entry.reach, entry.kind) for entry in degraded] == [(reach, "safety")]
    assert f"{library} 0.0.1" in degraded[0].detail
    assert not library_patches.applied(reach, degraded)
    # Hypercorn's internals are left alone on a version they were not written for.
    assert H2Protocol._vpsrelay_patched is (library != "hypercorn")  # type: ignore[attr-defined]


def test_a_performance_reach_only_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_versions(monkeypatch, httpcore="2.0.0")
    degraded = library_patches.apply_all(settings())
    assert [(entry.reach, entry.kind) for entry in degraded] == [("httpcore", "performance")]
    assert "running without the 512 KiB upstream reads: httpcore 2.0.0" in caplog.text


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_the_client_hello_hook_is_needed_for_tls_alpn_01_only(
    monkeypatch: pytest.MonkeyPatch, challenge: str
) -> None:
    monkeypatch.setattr(tls, "client_hello_hook_available", lambda: False)
    tls_settings = settings(
        **{"tls.domains": ["relay.example"], "tls.email": "a@b.example", "tls.challenge": challenge}
    )
    assert tls_settings.tls.enabled
    if challenge == "http-01":
        degraded = library_patches.apply_all(tls_settings)
        assert [(entry.reach, entry.kind) for entry in degraded] == [("client_hello", "function")]
    else:
        with pytest.raises(hypercorn_patches.PatchError, match="no _msg_callback hook"):
            library_patches.apply_all(tls_settings)
    # Without the hook the front context simply does not set it.
    context = tls.TLSState().front
    assert context._msg_callback is None  # type: ignore[attr-defined]


def test_serve_refuses_with_one_line_and_the_flag_reaches_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(H2Protocol, "_vpsrelay_patched", False)
    fake_versions(monkeypatch, hypercorn="0.19.0")
    result = CliRunner().invoke(
        cli.main, ["serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "vpsrelay: cannot serve: hypercorn 0.19.0 is installed, vpsrelay needs "
        "hypercorn==0.18.0 for the HTTP/2 buffer bound, stream reset and connection caps "
        "(install the pinned versions: pip install -c constraints.txt vpsrelay; or run "
        "degraded with --allow-unpatched)"
    )
    assert "Traceback" not in result.output


# --- reported: /readyz and `vpsrelay check`

DEGRADED = (
    Degraded("hypercorn", "safety", "hypercorn 0.19.0 is installed, vpsrelay needs ..."),
    Degraded("httpcore", "performance", "httpcore 2.0.0 is installed, vpsrelay needs ..."),
)


async def test_readyz_reports_a_degraded_relay(tmp_path: Path) -> None:
    async with relay(lambda request: challenge_401(), {"data_dir": str(tmp_path)}) as r:
        r.app.health.degraded = DEGRADED
        response = await r.client.get("/readyz")
    assert response.status_code == 200  # the operator chose to serve degraded
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["patches"] == "degraded: without hypercorn, httpcore"
    assert body["degraded"][0] == {
        "reach": "hypercorn",
        "kind": "safety",
        "detail": "hypercorn 0.19.0 is installed, vpsrelay needs ...",
    }


def test_check_fails_on_a_missing_safety_patch_and_warns_on_others() -> None:
    body = {
        "status": "degraded",
        "checks": {"tls": "off", "data_dir": "ok", "upstream": "ok", "patches": "degraded"},
        "degraded": [
            {"reach": entry.reach, "kind": entry.kind, "detail": entry.detail} for entry in DEGRADED
        ],
    }
    checker = check.Checker("http://relay.test", {})
    checker.client = httpx.Client(
        transport=httpx.MockTransport(lambda _: httpx.Response(200, json=body))
    )
    checker.readiness()
    rows = {row.check: row for row in checker.rows}
    assert rows["patches hypercorn"].result == check.FAIL
    assert "hypercorn 0.19.0" in rows["patches hypercorn"].detail
    assert "constraints.txt" in rows["patches hypercorn"].fix
    assert rows["patches httpcore"].result == check.WARN


def test_allow_unpatched_is_off_unless_set_in_the_environment_or_toml(tmp_path: Path) -> None:
    """Docker and compose users set it as VPSRELAY_SERVER__ALLOW_UNPATCHED."""
    assert not settings().server.allow_unpatched
    from_env = config.load(None, {"VPSRELAY_SERVER__ALLOW_UNPATCHED": "true"})
    assert from_env.server.allow_unpatched
    toml = tmp_path / "vpsrelay.toml"
    toml.write_text("[server]\nallow_unpatched = true\n")
    assert config.load(toml, {}).server.allow_unpatched
