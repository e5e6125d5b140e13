"""One verified HTTPS request, run inside a test network namespace (by ``DeployHost.probe``).

``python -m tests.infra.netprobe ADDRESS NAME CA PATH [HEADERS-JSON]`` connects to
ADDRESS:443 with SNI and Host NAME, verifies the certificate against CA only, sends GET PATH
(with HEADERS) over HTTP/2 if offered, and prints JSON: the leaf's SHA-256, the HTTP
version, the status and the challenge header.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import sys

import httpx


def probe(address: str, name: str, ca: str, path: str, headers: str = "{}") -> dict[str, object]:
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection((address, 443), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        leaf = tls.getpeercert(binary_form=True) or b""
    with httpx.Client(http2=True, verify=context, timeout=20, trust_env=False) as client:
        response = client.get(
            f"https://{address}{path}",
            headers={**json.loads(headers), "host": name},
            extensions={"sni_hostname": name},
        )
    return {
        "sha256": hashlib.sha256(leaf).hexdigest(),
        "http_version": response.http_version,
        "status": response.status_code,
        "www_authenticate": response.headers.get("www-authenticate", ""),
    }


if __name__ == "__main__":
    print(json.dumps(probe(*sys.argv[1:6])))
