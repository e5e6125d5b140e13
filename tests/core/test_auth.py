"""Challenges and token scopes: parse, format, rewrite."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from hypothesis import given, strategies as st

from vpsrelay import errors
from vpsrelay.core import auth, routing
from vpsrelay.core.auth import Challenge, Scope
from vpsrelay.errors import BadRequest

HUB_CHALLENGE = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
    'scope="repository:library/alpine:pull"'
)


def hub_name(name: str) -> str:
    return routing.to_upstream_name("docker.io", name)


# --- parse_challenge


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            HUB_CHALLENGE,
            Challenge(
                "Bearer",
                (
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/alpine:pull"),
                ),
            ),
        ),
        ("Basic", Challenge("Basic", ())),
        ("  Basic  ", Challenge("Basic", ())),
        ('Basic realm="Registry Realm"', Challenge("Basic", (("realm", "Registry Realm"),))),
        # token values, optional whitespace around '=' and ',', a trailing comma
        (
            "Bearer realm = relay.example , service=hub",
            Challenge("Bearer", (("realm", "relay.example"), ("service", "hub"))),
        ),
        ('Bearer realm="r",', Challenge("Bearer", (("realm", "r"),))),
        # commas and '=' inside a quoted-string do not split it
        (
            'Bearer realm="https://a/t?x=1,y=2",scope="repository:a:pull,push"',
            Challenge(
                "Bearer",
                (("realm", "https://a/t?x=1,y=2"), ("scope", "repository:a:pull,push")),
            ),
        ),
        # quoted-pair escapes
        (
            r'Bearer realm="say \"hi\"",error="back\\slash"',
            Challenge("Bearer", (("realm", 'say "hi"'), ("error", "back\\slash"))),
        ),
        (r'Bearer realm="a\,b"', Challenge("Bearer", (("realm", "a,b"),))),
        ('Bearer realm=""', Challenge("Bearer", (("realm", ""),))),
    ],
)
def test_parse_challenge(header, expected):
    assert auth.parse_challenge(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        '"Bearer"',
        "Bearer,realm=x",
        "Bearer realm",
        "Bearer realm=",
        'Bearer realm="unterminated',
        'Bearer realm="a" service="b"',  # a missing comma
        'Bearer realm="a",,service="b"',
        "Bearer realm=a b",
        "Bearer realm=https://a/token",  # '/' and ':' are no tchars: it must be quoted
        'Bearer realm="a"junk',
        "Bearer =x",
        'Bearer realm="a", Basic realm="b"',  # one challenge per call
        'Bearer realm="a\\\nb"',  # quoted-pair with a line feed
    ],
)
def test_parse_challenge_rejects_malformed(header):
    with pytest.raises(errors.UpstreamProtocolError):
        auth.parse_challenge(header)


def test_challenge_accessors_are_case_insensitive():
    challenge = auth.parse_challenge('bEaReR Realm="r",SERVICE="s"')
    assert challenge.is_bearer
    assert challenge.realm == "r"
    assert challenge.service == "s"
    assert challenge.get("scope") is None
    assert not Challenge("Basic", ()).is_bearer
    assert Challenge("Basic", ()).realm is None


def test_with_param_replaces_in_place_or_appends():
    challenge = auth.parse_challenge('Bearer Realm="old",service="s"')
    assert challenge.with_param("realm", "new").params == (("Realm", "new"), ("service", "s"))
    assert challenge.with_param("scope", "x").params == (
        ("Realm", "old"),
        ("service", "s"),
        ("scope", "x"),
    )


@pytest.mark.parametrize(
    ("challenge", "header"),
    [
        (Challenge("Basic", ()), "Basic"),
        (Challenge("Bearer", (("realm", "r"),)), 'Bearer realm="r"'),
        (
            Challenge("Bearer", (("realm", 'a"b\\c'), ("service", "s,t"))),
            r'Bearer realm="a\"b\\c",service="s,t"',
        ),
    ],
)
def test_format_challenge(challenge, header):
    assert challenge.format() == header
    assert auth.parse_challenge(header) == challenge


@pytest.mark.parametrize(
    "header",
    [
        HUB_CHALLENGE,
        r'Bearer realm="say \"hi\"",error="back\\slash"',
        'Bearer realm="https://a/t?x=1,y=2",scope="repository:a:pull,push"',
        'Basic realm="Registry Realm"',
    ],
)
def test_parse_format_round_trip(header):
    challenge = auth.parse_challenge(header)
    assert auth.parse_challenge(challenge.format()) == challenge


# --- rewrite_challenge


def test_rewrite_challenge_points_bearer_realm_at_the_relay():
    rewritten = auth.rewrite_challenge(auth.parse_challenge(HUB_CHALLENGE), "https://relay/token")
    assert rewritten.realm == "https://relay/token"
    assert rewritten.service == "registry.docker.io"
    assert rewritten.get("scope") == "repository:library/alpine:pull"
    assert rewritten.format() == (
        'Bearer realm="https://relay/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )


def test_rewrite_challenge_leaves_basic_untouched():
    basic = auth.parse_challenge('Basic realm="Registry Realm"')
    assert auth.rewrite_challenge(basic, "https://relay/token") is basic


@pytest.mark.parametrize("header", ['Bearer service="s"', "Bearer", 'Bearer realm=""'])
def test_rewrite_challenge_bearer_without_realm_is_an_error(header):
    with pytest.raises(errors.UpstreamProtocolError):
        auth.rewrite_challenge(auth.parse_challenge(header), "https://relay/token")


# --- scopes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("repository:alpine:pull", Scope("repository", "alpine", "pull")),
        ("repository:library/alpine:pull,push", Scope("repository", "library/alpine", "pull,push")),
        ("repository(plugin):vieux/sshfs:pull", Scope("repository(plugin)", "vieux/sshfs", "pull")),
        ("registry:catalog:*", Scope("registry", "catalog", "*")),
        ("repository:host:5000/x:pull", Scope("repository", "host:5000/x", "pull")),
        ("repository:alpine:", Scope("repository", "alpine", "")),
    ],
)
def test_scope_parse(text, expected):
    assert Scope.parse(text) == expected
    assert expected.format() == text


@pytest.mark.parametrize("text", ["", "pull", "repository", "repository:alpine", ":a:b", "a::b"])
def test_scope_parse_other_shapes_is_none(text):
    assert Scope.parse(text) is None


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        (["repository:alpine:pull"], ["repository:library/alpine:pull"]),
        (["repository:library/alpine:pull"], ["repository:library/alpine:pull"]),
        (["repository:bitnami/redis:pull"], ["repository:bitnami/redis:pull"]),
        (
            ["repository:alpine:pull", "repository:busybox:pull,push"],
            ["repository:library/alpine:pull", "repository:library/busybox:pull,push"],
        ),
        (
            ["repository:alpine:pull repository:busybox:pull"],
            ["repository:library/alpine:pull repository:library/busybox:pull"],
        ),
        (["repository(plugin):sshfs:pull"], ["repository(plugin):library/sshfs:pull"]),
        (["registry:catalog:*"], ["registry:catalog:*"]),
        (["registry:catalog:* repository:alpine:pull"],
         ["registry:catalog:* repository:library/alpine:pull"]),
        (["garbage", ""], ["garbage", ""]),
        ([], []),
    ],
)  # fmt: skip
def test_rewrite_scopes(scopes, expected):
    assert auth.rewrite_scopes(scopes, hub_name) == expected


def test_rewrite_scopes_keeps_host_port_names_for_a_permissive_mapper():
    assert auth.rewrite_scopes(["repository:host:5000/x:pull"], lambda n: f"m/{n}") == [
        "repository:m/host:5000/x:pull"
    ]


@pytest.mark.parametrize(
    "scope", ["repository:host:5000/x:pull", "repository:Alpine:pull", "repository:../x:pull"]
)
def test_rewrite_scopes_propagates_name_errors(scope):
    with pytest.raises(errors.NameInvalid):
        auth.rewrite_scopes([scope], hub_name)


@pytest.mark.parametrize(
    ("params", "service", "expected"),
    [
        (
            [("scope", "repository:alpine:pull"), ("service", "registry.docker.io")],
            "registry.docker.io",
            [("service", "registry.docker.io"), ("scope", "repository:library/alpine:pull")],
        ),
        # the upstream's advertised service wins over what the client echoes
        (
            [("service", "stale"), ("account", "me"), ("scope", "repository:a:pull")],
            "registry.docker.io",
            [
                ("service", "registry.docker.io"),
                ("account", "me"),
                ("scope", "repository:library/a:pull"),
            ],
        ),
        # no advertised service: the client's is kept; no refresh token asked for
        (
            [("service", "mine"), ("offline_token", "true"), ("client_id", "docker")],
            None,
            [("service", "mine"), ("client_id", "docker")],
        ),
        # neither: no service at all
        ([("account", "me")], None, [("account", "me")]),
        ([], None, []),
        (
            [("scope", "repository:a:pull"), ("scope", "repository:b/c:pull registry:catalog:*")],
            "s",
            [
                ("service", "s"),
                ("scope", "repository:library/a:pull"),
                ("scope", "repository:b/c:pull"),
            ],
        ),
        # only pull survives: push, delete and * are dropped, as are scopes without pull
        (
            [("scope", "repository:a:push,pull,delete"), ("scope", "repository:b:*"),
             ("scope", "repository:c:push repository(plugin):d:pull registry:catalog:*"),
             ("scope", "repository:a:pull")],
            "s",
            [("service", "s"), ("scope", "repository:library/a:pull")],
        ),
    ],
)  # fmt: skip
def test_token_request_params(params, service, expected):
    assert auth.token_request_params(params, hub_name, service) == expected


def test_token_request_params_rejects_invalid_names():
    with pytest.raises(errors.NameInvalid):
        auth.token_request_params([("scope", "repository:UPPER:pull")], hub_name, "s")


def test_token_request_params_keep_refresh_requests_only_for_the_clients_own_credentials():
    params = [("offline_token", "true"), ("access_type", "offline"), ("client_id", "docker")]
    assert auth.token_request_params(params, hub_name, "s") == [
        ("service", "s"), ("client_id", "docker"),
    ]  # fmt: skip
    assert auth.token_request_params(params, hub_name, "s", offline=True) == [
        ("service", "s"), *params,
    ]  # fmt: skip


def test_pull_scopes_drop_repositories_the_relay_does_not_serve():
    scopes = ["repository:alpine:pull,push", "repository:private/secret:pull repository:b:pull"]
    served = auth.pull_scopes(scopes, hub_name, lambda name: not name.startswith("private/"))
    assert served == ["library/alpine", "library/b"]
    params = [("scope", value) for value in scopes]
    assert auth.token_request_params(
        params, hub_name, None, admits=lambda name: name != "library/b"
    ) == [("scope", "repository:library/alpine:pull"), ("scope", "repository:private/secret:pull")]


def test_a_token_request_names_at_most_max_scopes():
    """Issue 12 follow-up, finding 2: each scope costs the relay an upstream token entry
    and URL length, so a request naming more than real clients do is refused."""
    ten = [f"repository:r{n}:pull" for n in range(auth.MAX_SCOPES)]
    assert len(auth.pull_scopes([" ".join(ten)], str, lambda name: True)) == auth.MAX_SCOPES
    with pytest.raises(BadRequest) as refused:
        auth.pull_scopes([*ten, "registry:catalog:*"], str, lambda name: True)
    assert refused.value.status == 400
    assert refused.value.reason == "too_many_scopes"
    with pytest.raises(BadRequest):  # however they are spread over the values
        auth.token_request_params([("scope", f"{s} {s}") for s in ten], str, None)


@given(st.lists(st.text(alphabet="abcpushldetr*,: /", max_size=40), max_size=5))
def test_token_request_params_never_ask_for_more_than_pull(scopes):
    def lenient(name: str) -> str:
        return name

    named = sum(len([t for t in s.split(" ") if t]) for s in scopes)
    if named > auth.MAX_SCOPES:
        with pytest.raises(BadRequest):
            auth.token_request_params([("scope", s) for s in scopes], lenient, "s")
        return
    for key, value in auth.token_request_params([("scope", s) for s in scopes], lenient, "s"):
        if key == "scope":
            parsed = auth.Scope.parse(value)
            assert parsed is not None
            assert (parsed.resource_type, parsed.actions) == ("repository", "pull")


# --- properties

TOKENS = st.text(alphabet="!#$%&'*+.^_`|~0123456789AZaz-", min_size=1, max_size=12)
VALUES = st.text(max_size=30)
CHALLENGES = st.builds(
    Challenge, TOKENS, st.lists(st.tuples(TOKENS, VALUES), max_size=5).map(tuple)
)
HEADERISH = st.one_of(
    st.text(),
    st.lists(st.sampled_from(['Bearer', ' ', 'realm', '=', '"', '\\', ',', 'x', '\t', '\n', 'é']),
             max_size=25).map("".join),
)  # fmt: skip


@given(HEADERISH)
def test_parse_challenge_returns_or_raises_relay_error(header):
    try:
        challenge = auth.parse_challenge(header)
    except errors.RelayError:
        return
    assert isinstance(challenge, Challenge)
    assert auth.parse_challenge(challenge.format()) == challenge


@given(CHALLENGES)
def test_format_parse_round_trip(challenge):
    assert auth.parse_challenge(challenge.format()) == challenge


@given(st.text())
def test_scope_parse_format_round_trip_on_text(text):
    scope = Scope.parse(text)
    if scope is not None:
        assert scope.format() == text


@given(
    st.text(min_size=1).filter(lambda t: ":" not in t),
    st.text(min_size=1),
    st.text().filter(lambda t: ":" not in t),
)
def test_scope_format_parse_round_trip(resource_type, name, actions):
    scope = Scope(resource_type, name, actions)
    assert Scope.parse(scope.format()) == scope


# --- token request URLs and answers


def test_token_url_appends_params_to_a_plain_realm() -> None:
    url = auth.token_url(
        "https://auth.example/token",
        [("service", "registry.example"), ("scope", "repository:library/a b:pull")],
    )
    assert url == (
        "https://auth.example/token?service=registry.example"
        "&scope=repository%3Alibrary%2Fa+b%3Apull"
    )


def test_token_url_keeps_the_query_a_realm_already_has() -> None:
    url = auth.token_url("http://127.0.0.1:5001/token?account=x&a=%2F", [("scope", "s")])
    assert url == "http://127.0.0.1:5001/token?account=x&a=%2F&scope=s"


def test_token_url_without_params_is_the_realm_without_its_fragment() -> None:
    assert auth.token_url("https://a.example/t?x=1#frag", []) == "https://a.example/t?x=1"


@pytest.mark.parametrize(
    "realm",
    [
        "",
        "/token",
        "auth.example/token",
        "ftp://auth.example/token",
        "file:///etc/passwd",
        "https:///token",
        "http://[::1/token",
        "http://a.example:port/token",
        "http://a.example/to ken",
        "http://a.example/\ntoken",
    ],
)
def test_token_url_refuses_a_realm_that_is_not_an_absolute_http_url(realm: str) -> None:
    with pytest.raises(ValueError, match="realm") as caught:
        auth.token_url(realm, [("scope", "x")])
    assert repr(realm) in str(caught.value)


_QUERY_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)


@given(
    existing=st.lists(st.tuples(_QUERY_TEXT, _QUERY_TEXT), max_size=3),
    params=st.lists(st.tuples(_QUERY_TEXT, _QUERY_TEXT), max_size=4),
)
def test_token_url_round_trips_both_queries_in_order(
    existing: list[tuple[str, str]], params: list[tuple[str, str]]
) -> None:
    realm = (
        f"https://auth.example/token?{urlencode(existing)}"
        if existing
        else ("https://auth.example/token")
    )
    url = auth.token_url(realm, params)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "auth.example", "/token")
    assert parse_qsl(parts.query, keep_blank_values=True) == [
        (k, v) for k, v in [*existing, *params]
    ]


def test_token_form_encodes_the_params_and_names_its_type() -> None:
    body, header = auth.token_form([("grant_type", "password"), ("password", "p&q=r")])
    assert body == b"grant_type=password&password=p%26q%3Dr"
    assert header == ("content-type", "application/x-www-form-urlencoded")


def test_parse_token_answer_reads_token_lifetime_and_issue_time() -> None:
    answer = auth.parse_token_answer(
        b'{"token": "abc.def", "expires_in": 300, "issued_at": "2026-01-01T00:00:00Z"}'
    )
    assert answer == auth.TokenAnswer("abc.def", 300.0, "2026-01-01T00:00:00Z")


def test_parse_token_answer_falls_back_to_access_token_and_default_lifetime() -> None:
    answer = auth.parse_token_answer(b'{"access_token": "xyz=="}')
    assert answer == auth.TokenAnswer("xyz==", auth.DEFAULT_TOKEN_SECONDS, None)


@pytest.mark.parametrize("lifetime", ['"soon"', "0", "-5", "true", "null", "[]", "1e999"])
def test_parse_token_answer_odd_lifetimes_mean_the_default(lifetime: str) -> None:
    body = f'{{"token": "t", "expires_in": {lifetime}}}'.encode()
    assert auth.parse_token_answer(body).expires_in == auth.DEFAULT_TOKEN_SECONDS


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"token"',
        b"{}",
        b'{"token": ""}',
        b'{"token": 5}',
        b'{"token": "a b"}',
        b'{"token": "a\\r\\nx-injected: 1"}',
        b'{"token": "=abc"}',
    ],
)
def test_parse_token_answer_refuses_an_answer_without_a_usable_token(body: bytes) -> None:
    with pytest.raises(ValueError, match="token service answered"):
        auth.parse_token_answer(body)


@given(st.binary(max_size=200))
def test_parse_token_answer_raises_only_value_error(body: bytes) -> None:
    try:
        answer = auth.parse_token_answer(body)
    except ValueError:
        return
    assert auth.TOKEN68.fullmatch(answer.token)
    assert answer.expires_in > 0
