"""The exchange module stands below the app: what uses it does not load `vpsrelay.app`."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Port 80's lifespan answer, which once imported the app late (at the first lifespan event).
PLAIN_PORT_LIFESPAN = """
import trio
from vpsrelay.tls import contexts as tls

async def main():
    sent = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    async def receive():
        return next(messages)
    async def send(message):
        sent.append(message["type"])
    await tls.PlainPort(None, 443)({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"], sent

trio.run(main)
"""


@pytest.mark.parametrize(
    "module", ["vpsrelay.exchange", "vpsrelay.cache.sending", "vpsrelay.tls.contexts"]
)
def test_importing_does_not_load_the_app(module: str) -> None:
    # A fresh interpreter: this one has long since imported the app for other tests.
    program = (
        f"import sys\nimport {module}\n{PLAIN_PORT_LIFESPAN}\nprint('vpsrelay.app' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", done.stdout
