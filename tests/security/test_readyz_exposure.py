"""The public /readyz does not name the operator's accounts.

/metrics shows each pool account's username and state only to an allowed address or the
metrics token; /readyz on the main listener answers anyone, so it shows how many
accounts serve and rest, and the names only to whom /metrics would answer (or on the
operator listener, `metrics.listen`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.relay import RelayProcess, pull_token

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
METRICS_TOKEN = "metrics-token-4f1c9e"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TIMEOUT = 20.0


def test_readyz_names_the_pool_accounts_only_to_the_operator(
    clean_hub: Hub, tmp_path: Path
) -> None:
    alice, password = clean_hub.creds
    config = tmp_path / "relay.toml"
    # The test's own address (127.0.0.1) is not on the allow list: it is the public here.
    config.write_text(
        f'[metrics]\nallow = ["192.0.2.0/24"]\ntoken = "{METRICS_TOKEN}"\n\n'
        '[registries."docker.io"]\n'
        f'credentials = [{{ username = "{alice}", password = "{password}" }}]\n'
    )
    args = ("--config", str(config), "--upstream", f"docker.io={clean_hub.registry_url}")
    with RelayProcess(tmp_path / "relay", *args) as relay:
        token = pull_token(relay.url, "library/alpine")
        pulled = httpx.get(
            f"{relay.url}/v2/library/alpine/manifests/latest",
            headers={"authorization": f"Bearer {token}", "accept": OCI_MANIFEST},
            timeout=TIMEOUT,
        )
        assert pulled.status_code == 200, pulled.text  # the pool's account was used

        public = httpx.get(f"{relay.url}/readyz", timeout=TIMEOUT)
        assert public.status_code == 200, public.text
        entry = public.json()["upstreams"]["docker.io"]
        assert entry["credential_counts"] == {"ready": 1, "resting": 0}
        assert "credentials" not in entry
        assert alice not in public.text

        for wrong in ("Bearer not-the-token", f"Basic {METRICS_TOKEN}"):
            guessed = httpx.get(
                f"{relay.url}/readyz", headers={"authorization": wrong}, timeout=TIMEOUT
            )
            assert alice not in guessed.text, wrong

        operator = httpx.get(
            f"{relay.url}/readyz",
            headers={"authorization": f"Bearer {METRICS_TOKEN}"},
            timeout=TIMEOUT,
        )
        assert list(operator.json()["upstreams"]["docker.io"]["credentials"]) == [alice]
