from __future__ import annotations

import pytest

from vpsrelay.core.auth import fresh_token_may_help

REALM = 'Bearer realm="https://auth.example/token",service="registry.example"'


@pytest.mark.parametrize(
    ("challenges", "helps"),
    [
        ([], True),
        ([REALM], True),  # no error named: perhaps expired
        ([f'{REALM},error="invalid_token"'], True),  # expired, revoked: a new one helps
        ([f'{REALM},scope="repository:p/s:pull",error="insufficient_scope"'], False),
        (['Basic realm="r"', f'{REALM},error="insufficient_scope"'], False),
        (['Basic realm="r",error="insufficient_scope"'], True),  # not a Bearer word
        (["\x00not a challenge", REALM], True),
    ],
)
def test_a_fresh_token_is_fetched_unless_the_token_merely_lacks_the_rights(challenges, helps):
    assert fresh_token_may_help(challenges) is helps
