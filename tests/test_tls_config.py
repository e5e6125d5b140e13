"""The `[tls]` section: names agreed with the deployment files, env vars, flags, errors."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import pytest
import trustme
from click.testing import CliRunner

from vpsrelay import config
from vpsrelay.cli import main
from vpsrelay.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path


def test_defaults_leave_tls_off() -> None:
    tls = config.load(None, {}).tls
    assert not tls.enabled
    assert tls.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert tls.challenge == "http-01"
    assert tls.renew_before == pytest.approx(1 / 3)
    assert tls.https_listen == ("0.0.0.0:443",)
    assert tls.http_listen == ("0.0.0.0:80",)


def test_file_keys(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    path = tmp_path / "relay.toml"
    path.write_text(
        textwrap.dedent(f"""
        [tls]
        domains = ["Relay.Example.com", "mirror.example.com."]
        email = "you@example.com"
        acme_directory = "staging"
        challenge = "tls-alpn-01"
        renew_before = "1/2"
        https_listen = ["[::]:443", "0.0.0.0:443"]
        http_listen = "0.0.0.0:8080"
        acme_ca_bundle = "{bundle}"
        eab_kid = "kid-1"
        eab_hmac_key = "c2VjcmV0"
        """)
    )
    tls = config.load(path, {}).tls
    assert tls.enabled
    assert tls.acme
    assert tls.domains == ("relay.example.com", "mirror.example.com")
    assert tls.acme_directory == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert tls.challenge == "tls-alpn-01"
    assert tls.renew_before == 0.5
    assert tls.https_listen == ("[::]:443", "0.0.0.0:443")
    assert tls.http_listen == ("0.0.0.0:8080",)
    assert tls.acme_ca_bundle == bundle
    assert (tls.eab_kid, tls.eab_hmac_key) == ("kid-1", config.Secret("c2VjcmV0"))


def test_environment_names(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("c")
    key.write_text("k")
    environ = {
        "VPSRELAY_TLS__DOMAINS": "a.example,b.example",
        "VPSRELAY_TLS__EMAIL": "me@example.com",
        "VPSRELAY_TLS__ACME_DIRECTORY": "https://ca.example/dir",
        "VPSRELAY_TLS__HTTPS_LISTEN": "127.0.0.1:8443",
        "VPSRELAY_TLS__HTTP_LISTEN": "127.0.0.1:8080",
        "VPSRELAY_TLS__CERT_FILE": str(cert),
        "VPSRELAY_TLS__KEY_FILE": str(key),
        "VPSRELAY_TLS__RENEW_BEFORE": "0.25",
    }
    tls = config.load(None, environ).tls
    assert tls.domains == ("a.example", "b.example")
    assert tls.acme_directory == "https://ca.example/dir"
    assert tls.https_listen == ("127.0.0.1:8443",)
    assert (tls.cert_file, tls.key_file) == (cert, key)
    assert tls.enabled
    assert not tls.acme  # your own files win over ACME
    assert tls.renew_before == 0.25


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"VPSRELAY_TLS__DOMAINS": "*.example.com"}, "VPSRELAY_TLS__DOMAINS: tls.domains: "),
        ({"VPSRELAY_TLS__DOMAINS": "192.0.2.1"}, "no IP addresses"),
        ({"VPSRELAY_TLS__CHALLENGE": "dns-01"}, "expected one of http-01, tls-alpn-01"),
        ({"VPSRELAY_TLS__RENEW_BEFORE": "0"}, "tls.renew_before: expected a fraction"),
        ({"VPSRELAY_TLS__RENEW_BEFORE": "1/0"}, "tls.renew_before: expected a fraction"),
        ({"VPSRELAY_TLS__ACME_DIRECTORY": "http://ca.example/dir"}, "expected an https URL"),
        ({"VPSRELAY_TLS__HTTPS_LISTEN": "443"}, "tls.https_listen: expected HOST:PORT"),
        ({"VPSRELAY_TLS__ACME_CA_BUNDLE": "/nonexistent/ca.pem"}, "no such file"),
        ({"VPSRELAY_TLS__CERT_FILE": "/nonexistent/c.pem"}, "tls.cert_file: needs tls.key_file"),
        ({"VPSRELAY_TLS__EAB_KID": "kid"}, "tls.eab_kid: needs tls.eab_hmac_key"),
        (
            {"VPSRELAY_TLS__CERT_FILE": "/nonexistent/c", "VPSRELAY_TLS__KEY_FILE": "/x/k"},
            "VPSRELAY_TLS__CERT_FILE: tls.cert_file: no such file",
        ),
    ],
)
def test_bad_values_name_the_source_and_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        config.load(None, environ)
    assert message in caught.value.message


def test_unknown_key_in_the_tls_table(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[tls]\ndomain = ["a.example"]\n')
    with pytest.raises(ConfigError, match=r"tls\.domain: unknown key \(did you mean 'domains'\?\)"):
        config.load(path, {})


def test_serve_flags_reach_the_tls_section(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["serve", "--domain", "a.example", "--challenge", "dns-01"],
    )
    assert result.exit_code == 2
    result = runner.invoke(
        main, ["serve", "--domain", "*.example", "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2
    assert "vpsrelay: config error: --domain: tls.domains: expected DNS names" in result.output


def test_cert_status_of_own_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.example")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    result = CliRunner().invoke(main, ["cert", "status", "--cert", str(cert), "--key", str(key)])
    assert result.exit_code == 0, result.output
    assert "names:      relay.example" in result.output
    assert "days left:" in result.output


def test_cert_commands_without_tls_config_exit_2(tmp_path: Path) -> None:
    for command in (["cert", "status"], ["cert", "renew"]):
        result = CliRunner().invoke(main, [*command, "--data-dir", str(tmp_path)])
        assert result.exit_code == 2
        assert "TLS is not configured" in result.output


def test_cert_status_without_a_certificate_yet(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["cert", "status", "--domain", "a.example", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "no certificate at" in result.output
