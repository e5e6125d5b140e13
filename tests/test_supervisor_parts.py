"""Issue 14, the supervisor's small parts: the `server.workers` setting, the listener table
handed to workers, the challenge files every worker answers from, exit descriptions."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from vpsrelay import config, listeners, supervisor
from vpsrelay.cli import main
from vpsrelay.errors import ConfigError
from vpsrelay.tls import challenge_files, contexts

if TYPE_CHECKING:
    from pathlib import Path


def test_workers_default_to_the_usable_cpus() -> None:
    expected = max(1, min(64, len(os.sched_getaffinity(0))))
    assert config.load(None, {}).server.workers == expected
    assert config.usable_cpus() == expected


@pytest.mark.parametrize("value", ["0", "65", "two", "-1", "1.5"])
def test_workers_out_of_range_name_the_variable_and_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^VPSRELAY_SERVER__WORKERS: server\.workers: "):
        config.load(None, {"VPSRELAY_SERVER__WORKERS": value})


def test_workers_in_a_file_and_as_a_flag(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[server]\nworkers = 100\n")
    with pytest.raises(ConfigError, match=r"relay\.toml: server\.workers: expected 1 to 64"):
        config.load(path, {})
    path.write_text("[server]\nworkers = 3\n")
    assert config.load(path, {}).server.workers == 3
    result = CliRunner().invoke(main, ["serve", "--workers", "0"])
    assert result.exit_code == 2
    assert result.stderr.startswith("vpsrelay: config error: --workers: server.workers: ")


def test_bind_spec_uses_the_inherited_descriptor_of_its_role(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One address string may name listeners of several roles (tests use 127.0.0.1:0).
    table = {listeners.key(listeners.PLAIN, "127.0.0.1:0"): 7}
    table[listeners.key(listeners.HTTPS, "127.0.0.1:0")] = 9
    monkeypatch.setenv(listeners.ENVIRONMENT_NAME, listeners.encode(table))
    assert listeners.bind_spec(listeners.PLAIN, "127.0.0.1:0") == "fd://7"
    assert listeners.bind_spec(listeners.HTTPS, "127.0.0.1:0") == "fd://9"
    assert listeners.bind_spec(listeners.PORT80, "127.0.0.1:0") == "127.0.0.1:0"
    assert listeners.bind_spec(listeners.PLAIN, "[::1]:5000") == "[::1]:5000"
    monkeypatch.delenv(listeners.ENVIRONMENT_NAME)
    assert listeners.bind_spec(listeners.PLAIN, "127.0.0.1:0") == "127.0.0.1:0"


def test_bind_gives_an_inheritable_listening_socket_on_port_zero() -> None:
    sock = listeners.bind("127.0.0.1:0")
    try:
        assert sock.get_inheritable()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        url = listeners.url(sock, "http")
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        with pytest.raises(OSError):  # a taken port is an error, once, in the parent
            listeners.bind(url.removeprefix("http://"))
    finally:
        sock.close()


def test_challenge_files_round_trip_and_refuse_names_that_are_paths(tmp_path: Path) -> None:
    files = challenge_files.ChallengeFiles(tmp_path / "acme")
    files.clear()
    files.put(challenge_files.HTTP01, "tok-EN_1", "tok-EN_1.thumb")
    files.put(challenge_files.TLS_ALPN01, "relay.test", "key.auth")
    assert files.pending(challenge_files.HTTP01) == {"tok-EN_1": "tok-EN_1.thumb"}
    assert files.get(challenge_files.TLS_ALPN01, "relay.test") == "key.auth"
    assert files.any_pending(challenge_files.TLS_ALPN01)
    (tmp_path / "secret").write_text("do not serve")
    # A client's SNI or a token is never a path out of the directory.
    for name in ("../../secret", "..", "a/b", "", ".hidden", "RELAY.TEST", "x" * 300):
        assert files.get(challenge_files.TLS_ALPN01, name) is None
    with pytest.raises(ValueError, match="not a http-01 challenge name"):
        files.put(challenge_files.HTTP01, "../x", "v")
    files.remove(challenge_files.HTTP01, "tok-EN_1")
    files.remove(challenge_files.TLS_ALPN01, "relay.test")
    assert files.pending(challenge_files.HTTP01) == {}
    assert not files.any_pending(challenge_files.TLS_ALPN01)


def test_a_shared_tls_state_publishes_to_files_another_process_reads(tmp_path: Path) -> None:
    parent = contexts.TLSState(challenge_files.ChallengeFiles(tmp_path))
    worker = contexts.TLSState(challenge_files.ChallengeFiles(tmp_path))
    parent.add_http01("token1", "token1.print")
    assert worker.http01_tokens() == {"token1": "token1.print"}
    parent.add_tls_alpn01("Relay.Test", "auth")
    assert worker._tls_alpn01_pending()
    first = worker._tls_alpn01_context("relay.test")
    assert first is not None
    assert worker._tls_alpn01_context("relay.test") is first  # built once per challenge
    parent.remove_tls_alpn01("relay.test")
    parent.remove_http01("token1")
    assert worker._tls_alpn01_context("relay.test") is None
    assert worker.http01_tokens() == {}


def test_a_handshake_reads_the_challenge_directory_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = contexts.TLSState(challenge_files.ChallengeFiles(tmp_path))
    worker = contexts.TLSState(challenge_files.ChallengeFiles(tmp_path))
    parent.shared.clear()  # type: ignore[union-attr]
    folder = tmp_path / challenge_files.TLS_ALPN01
    listings: list[str] = []
    real_listdir = os.listdir

    def counted(path: str | os.PathLike[str]) -> list[str]:
        listings.append(str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", counted)
    settled = time.time_ns() - 60 * 10**9
    os.utime(folder, ns=(settled, settled))  # nothing changed for a minute
    assert not any(worker._tls_alpn01_pending() for _ in range(100))
    assert len(listings) <= 1
    # An order: seen by the very next handshake, and again by every one while it is recent.
    parent.add_tls_alpn01("relay.test", "auth")
    assert all(worker._tls_alpn01_pending() for _ in range(3))
    parent.remove_tls_alpn01("relay.test")
    assert not worker._tls_alpn01_pending()
    os.utime(folder, ns=(settled, settled))
    listings.clear()
    assert not any(worker._tls_alpn01_pending() for _ in range(100))
    assert len(listings) <= 1


def test_exit_descriptions() -> None:
    assert supervisor._exit_description(1) == "status 1"
    assert supervisor._exit_description(-signal.SIGKILL) == "signal SIGKILL"


def test_zombie_children_finds_an_unreaped_child() -> None:
    """What the parent reaps as PID 1 (in a container) besides its own workers."""
    import subprocess
    import time

    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in supervisor._zombie_children(os.getpid()):
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
    finally:
        child.wait(5)
    assert child.pid not in supervisor._zombie_children(os.getpid())
