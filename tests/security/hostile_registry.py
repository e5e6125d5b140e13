"""A hostile upstream registry (no auth) for the attacks on `/download` (issue 17's review).

Images, each `name:1` (any tag):

* `forge`: a 3 MB layer served right to a whole GET, but answered with zeros to a `Range`
  GET (`forge_ranges` counts those); with `ignore_range` every `Range` gets the whole 200.
* `big`: a config of about 900 KiB (under the relay's 1 MiB cap), one small layer.
* `huge`: a config of 4 MiB, over the cap.
* `zero`: a layer descriptor of size 0 naming the forge layer's (non-empty) digest.
* `deep`: a config nested 100 000 deep.
* `missing`: a layer the registry does not have (404).
* `fat`: an index of 4 MiB of junk entries (costly to parse).

`authorizations` lists the `Authorization` headers `/v2/` requests came with.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import tarfile
import threading

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.oci import MT_OCI_CONFIG, MT_OCI_LAYER_GZIP, MT_OCI_MANIFEST

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(seed: str, size: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = random.Random(seed).randbytes(size)
        info = tarfile.TarInfo("f")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0, compresslevel=1)


class HostileRegistry:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.forge_ranges = 0
        self.ignore_range = False
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        forge = layer("forge", 3_000_000)
        self.forge_digest = digest_of(forge)
        self.add("forge", forge)
        small = layer("small", 1000)
        self.add("big", small, extra={"pad": "x" * (900 * 1024)})
        self.add("huge", small, extra={"pad": "x" * (4 * 1024 * 1024)})
        self.add("zero", forge, size=0)
        nested = b"[" * 100_000 + b"]" * 100_000
        self.add("deep", small, config=b'{"os":"linux","architecture":"amd64","x":' + nested + b"}")
        gone = layer("gone", 1000)
        self.add("missing", gone)
        del self.blobs[digest_of(gone)]  # its manifest names a layer that is not there
        junk = b",".join([b"[]"] * (4 * 1024 * 1024 // 3 - 40))
        self.manifests["fat"] = (
            b'{"mediaType":"' + MT_OCI_INDEX.encode() + b'","manifests":[' + junk + b"]}"
        )
        owner = self

        class Handler(BaseHandler):
            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, *, body: bool) -> None:
                path = self.path.split("?")[0]
                with owner._lock:
                    owner.authorizations.append(self.headers.get("authorization"))
                if path in ("/v2/", "/v2"):
                    return self._send(200, b"{}", "application/json", body)
                found = re.fullmatch(r"/v2/(.+)/manifests/(.+)", path)
                if found:
                    name = found[1].rsplit("/", 1)[-1]
                    data = owner.manifests.get(found[2]) or owner.manifests.get(name)
                    if data is None:
                        return self._send(404, b"{}", "application/json", body)
                    kind = MT_OCI_INDEX if name == "fat" else MT_OCI_MANIFEST
                    extra = [("docker-content-digest", digest_of(data))]
                    return self._send(200, data, kind, body, extra)
                found = re.fullmatch(r"/v2/(.+)/blobs/(.+)", path)
                if not found or found[2] not in owner.blobs:
                    return self._send(404, b"{}", "application/json", body)
                data = owner.blobs[found[2]]
                wanted = self.headers.get("range")
                if wanted and not owner.ignore_range:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, end = int(first), int(last) if last else len(data) - 1
                    part = data[start : end + 1]
                    if found[2] == owner.forge_digest:
                        with owner._lock:
                            owner.forge_ranges += 1
                        part = bytes(len(part))  # zeros instead of the layer's bytes
                    extra = [("content-range", f"bytes {start}-{end}/{len(data)}")]
                    return self._send(206, part, "application/octet-stream", body, extra)
                return self._send(200, data, "application/octet-stream", body)

            def _send(
                self, status: int, data: bytes, kind: str, body: bool,
                extra: list[tuple[str, str]] | None = None,
            ) -> None:  # fmt: skip
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.send_header("docker-distribution-api-version", "registry/2.0")
                for key, value in extra or ():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = serve_in_thread(self.server, "hostile-registry")
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(
        self, name: str, blob: bytes, *, extra: dict[str, object] | None = None,
        size: int | None = None, config: bytes | None = None,
    ) -> None:  # fmt: skip
        self.blobs[digest_of(blob)] = blob
        if config is None:
            document: dict[str, object] = {
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [digest_of(gzip.decompress(blob))]},
            }  # fmt: skip
            document.update(extra or {})
            config = json.dumps(document).encode()
        self.blobs[digest_of(config)] = config
        self.manifests[name] = json.dumps({
            "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": {
                "mediaType": MT_OCI_CONFIG, "digest": digest_of(config), "size": len(config),
            },
            "layers": [{
                "mediaType": MT_OCI_LAYER_GZIP, "digest": digest_of(blob),
                "size": len(blob) if size is None else size,
            }],
        }).encode()  # fmt: skip

    def close(self) -> None:
        stop_server(self.server, self.thread)
