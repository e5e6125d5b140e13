"""What a relay of several workers shows the public about its workers.

`/readyz` answers anyone: each worker's name, state and heartbeat age, so a load balancer
and `vpsrelay check` see the relay whole; the workers' pids (host detail) only to whom
`/metrics` answers, as the pool's account names. `/metrics` (every worker's totals) stays
closed to the public on every worker, and a guessed token opens neither.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infra.workerpair import WorkerPair, worker_pair
from tests.infra.workers import clients_by_worker, label_of, new_marker
from vpsrelay import worker_identity

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import httpx

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
METRICS_TOKEN = "metrics-token-9b2e71"
TIMEOUT = 20.0
PROBES = 40  # new connections before each worker must hold one
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


def _get(
    pair: WorkerPair, client: httpx.Client, path: str, worker: str, guess: str
) -> httpx.Response:
    """GET `path` on `client`'s connection, which `worker` must answer."""
    marker = new_marker()
    headers = {"authorization": guess} if guess else {}
    response = client.get(
        f"{pair.url}{path}", params={"probe": marker}, headers=headers, timeout=TIMEOUT
    )
    assert label_of(pair.relay, marker) == worker
    return response


def test_readyz_names_workers_but_shows_pids_only_to_the_operator(pair: WorkerPair) -> None:
    pids = [str(pair.pid(number)) for number in (1, 2)]
    with clients_by_worker(pair.relay, 1, PROBES) as by_worker:
        for worker, (client,) in by_worker.items():
            for guess in GUESSES:
                response = _get(pair, client, "/readyz", worker, guess)
                assert response.status_code == 200, response.text
                workers = response.json()["workers"]
                assert [(w["worker"], w["state"]) for w in workers] == [
                    ("w1", "ready"),
                    ("w2", "ready"),
                ]
                assert all("pid" not in w for w in workers), guess
                assert not any(pid in response.text for pid in pids), guess
            operator = _get(pair, client, "/readyz", worker, f"Bearer {METRICS_TOKEN}")
            assert [str(w["pid"]) for w in operator.json()["workers"]] == pids


def test_metrics_stay_closed_on_every_worker(pair: WorkerPair) -> None:
    with clients_by_worker(pair.relay, 1, PROBES) as by_worker:
        for worker, (client,) in by_worker.items():
            for guess in GUESSES:
                response = _get(pair, client, "/metrics", worker, guess)
                assert response.status_code == 403, (worker, guess)
                assert "vpsrelay_" not in response.text
        operator = f"Bearer {METRICS_TOKEN}"
        text = _get(pair, by_worker["w1"][0], "/metrics", "w1", operator).text
    assert refusals(text) == 2 * len(GUESSES)  # both workers' refusals, counted as one


def test_a_missing_run_directory_fails_the_scrape_not_the_worker(pair: WorkerPair) -> None:
    """Someone removes `<data_dir>/run/metrics` under a running relay: /metrics answers
    503 and says why in the log; the workers go on serving."""
    pids = sorted(pair.relay.worker_pids())
    shutil.rmtree(worker_identity.metrics_dir(pair.data_dir))
    operator = f"Bearer {METRICS_TOKEN}"
    with clients_by_worker(pair.relay, 1, PROBES) as by_worker:
        for worker, (client,) in by_worker.items():
            response = _get(pair, client, "/metrics", worker, operator)
            assert response.status_code == 503
            assert "vpsrelay_" not in response.text
            assert _get(pair, client, "/readyz", worker, "").status_code == 200
    assert "cannot read the workers' metrics" in pair.relay.log_text()
    assert sorted(pair.relay.worker_pids()) == pids  # no worker died of it
