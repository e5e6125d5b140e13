from __future__ import annotations

import pytest

from vpsrelay import worker_identity
from vpsrelay.worker_identity import SINGLE, WorkerIdentity


def test_unset_is_the_single_process() -> None:
    assert worker_identity.parse(None) is SINGLE
    assert SINGLE.label == "main"
    assert not SINGLE.supervised


def test_a_worker_is_named_by_its_number() -> None:
    identity = worker_identity.parse("2/4")
    assert identity == WorkerIdentity(2, 4)
    assert identity.label == "w2"
    assert identity.supervised
    assert identity.environment_value() == "2/4"


@pytest.mark.parametrize("value", ["0/2", "3/2", "1", "a/b", "1/2/3", " 1/2", "01/2"])
def test_malformed_values_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="_VPSRELAY_WORKER"):
        worker_identity.parse(value)
