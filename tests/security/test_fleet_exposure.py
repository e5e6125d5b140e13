"""What a relay of several workers shows the public about its workers.

`/readyz` answers anyone: each worker's name, state and heartbeat age, so a load balancer
and `vpsrelay check` see the relay whole; the workers' pids (host detail) only to whom
`/metrics` answers, as the pool's account names. `/metrics` (every worker's totals) stays
closed to the public on every worker, and a guessed token opens neither.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infra.workerpair import WorkerPair, worker_pair
from vpsrelay import worker_identity

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
METRICS_TOKEN = "metrics-token-9b2e71"
TIMEOUT = 20.0
GUESSES = ("Bearer not-the-token", f"Basic {METRICS_TOKEN}", f"Bearer {METRICS_TOKEN}x", "")


@pytest.fixture
def pair(clean_hub: Hub, tmp_path: Path) -> Iterator[WorkerPair]:
    config = tmp_path / "relay.toml"
    # The test's own address (127.0.0.1) is not on the allow list: it is the public here.
    config.write_text(f'[metrics]\nallow = ["192.0.2.0/24"]\ntoken = "{METRICS_TOKEN}"\n')
    args = ("--config", str(config), "--upstream", f"docker.io={clean_hub.registry_url}")
    with worker_pair(tmp_path, *args, env={"VPSRELAY_CACHE__ENABLED": "false"}) as workers:
        workers.wait_ready()
        yield workers


def refusals(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for entry in family.samples:
            if entry.name == "vpsrelay_refusals_total" and entry.labels == {
                "reason": "metrics_forbidden"
            }:
                return float(entry.value)
    return 0.0


def test_readyz_names_workers_but_shows_pids_only_to_the_operator(pair: WorkerPair) -> None:
    pids = [str(pair.pid(number)) for number in (1, 2)]
    for url in pair.urls:
        for guess in GUESSES:
            headers = {"authorization": guess} if guess else {}
            response = httpx.get(f"{url}/readyz", headers=headers, timeout=TIMEOUT)
            assert response.status_code == 200, response.text
            workers = response.json()["workers"]
            assert [(w["worker"], w["state"]) for w in workers] == [
                ("w1", "ready"),
                ("w2", "ready"),
            ]
            assert all("pid" not in w for w in workers), guess
            assert not any(pid in response.text for pid in pids), guess
        operator = httpx.get(
            f"{url}/readyz",
            headers={"authorization": f"Bearer {METRICS_TOKEN}"},
            timeout=TIMEOUT,
        )
        assert [str(w["pid"]) for w in operator.json()["workers"]] == pids


def test_metrics_stay_closed_on_every_worker(pair: WorkerPair) -> None:
    for url in pair.urls:
        for guess in GUESSES:
            headers = {"authorization": guess} if guess else {}
            response = httpx.get(f"{url}/metrics", headers=headers, timeout=TIMEOUT)
            assert response.status_code == 403, (url, guess)
            assert "vpsrelay_" not in response.text
    operator = {"authorization": f"Bearer {METRICS_TOKEN}"}
    text = httpx.get(f"{pair.urls[0]}/metrics", headers=operator, timeout=TIMEOUT).text
    assert refusals(text) == 2 * len(GUESSES)  # both workers' refusals, counted as one


def test_a_missing_run_directory_fails_the_scrape_not_the_worker(pair: WorkerPair) -> None:
    """Someone removes `<data_dir>/run/metrics` under a running relay: /metrics answers
    503 and says why in the log; the worker goes on serving."""
    shutil.rmtree(worker_identity.metrics_dir(pair.data_dir))
    operator = {"authorization": f"Bearer {METRICS_TOKEN}"}
    url = pair.urls[0]
    response = httpx.get(f"{url}/metrics", headers=operator, timeout=TIMEOUT)
    assert response.status_code == 503
    assert "vpsrelay_" not in response.text
    assert httpx.get(f"{url}/healthz", timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=TIMEOUT).status_code == 200
    assert "cannot read the workers' metrics" in pair.processes[0].log_text()
