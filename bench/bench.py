"""vpsrelay beside its peers, on loopback, in one run; prints one table (see docs/benchmarks.md).

Upstream: Distribution (`docker-registry`) serving blobs from a storage directory written
here (no auth, no redirect), so the upstream is never the bottleneck. Peers in front of it:
nginx (`proxy_buffering off`), Caddy `reverse_proxy`, Distribution in proxy mode
(`proxy.remoteurl`), vpsrelay pass-through (cache off), vpsrelay cold (cache on, empty: a
miss that fills) and warm (cache hit); "direct" is the upstream itself and "nginx static"
nginx serving the blob file. Clients are curl (bytes), h2load (h2c) and wrk (HTTP/1.1).
Every process is started here, on 127.0.0.1 and ports the OS picked, and stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.infra.hub import start_registry  # noqa: E402
from tests.infra.pebble import free_port  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO = "bench/big"
TICK = os.sysconf("SC_CLK_TCK")
PY = str(ROOT / ".venv" / "bin" / "python")


# --- the upstream's storage, written directly (Distribution's filesystem layout)


@dataclass
class Blob:
    digest: str
    size: int
    path: Path


def write_blob(storage: Path, size: int, seed: int) -> Blob:
    tmp = storage / f"tmp-{seed}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256()
    with tmp.open("wb") as f:
        left = size
        while left > 0:
            piece = os.urandom(min(left, 4 * MiB))
            f.write(piece)
            sha.update(piece)
            left -= len(piece)
    hexd = sha.hexdigest()
    final = storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)
    return Blob(f"sha256:{hexd}", size, final)


def link(storage: Path, blob: Blob, manifest: bool = False) -> None:
    hexd = blob.digest[7:]
    repo = storage / "docker/registry/v2/repositories" / REPO
    sub = "_manifests/revisions/sha256" if manifest else "_layers/sha256"
    path = repo / sub / hexd / "link"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(blob.digest)


def small_blob(storage: Path, data: bytes) -> Blob:
    hexd = hashlib.sha256(data).hexdigest()
    final = storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(data)
    return Blob(f"sha256:{hexd}", len(data), final)


def seed_storage(storage: Path, big: int, medium: int) -> dict[str, Blob]:
    blobs = {"big": write_blob(storage, big, 1), "medium": write_blob(storage, medium, 2)}
    config = small_blob(
        storage, b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}'
    )
    for blob in (*blobs.values(), config):
        link(storage, blob)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.digest,
                "size": config.size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": b.digest,
                    "size": b.size,
                }
                for b in blobs.values()
            ],
        }
    ).encode()
    mblob = small_blob(storage, manifest)
    link(storage, mblob, manifest=True)
    tags = storage / "docker/registry/v2/repositories" / REPO / "_manifests/tags/latest"
    (tags / "current").mkdir(parents=True, exist_ok=True)
    (tags / "current/link").write_text(mblob.digest)
    index = tags / "index/sha256" / mblob.digest[7:]
    index.mkdir(parents=True, exist_ok=True)
    (index / "link").write_text(mblob.digest)
    blobs["manifest"] = mblob
    return blobs


# --- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes] | None
    url: str
    tls_url: str | None = None
    h2c: bool = True  # cleartext port speaks h2c (prior knowledge) as well as HTTP/1.1
    h2c_url: str | None = None  # a separate h2c port (nginx)
    stop_fn: Any = None
    pid: int = 0
    # Removed after the peer stops: a run's cached copies (1 GiB each) otherwise pile up in
    # the page cache, and a VM pays a slow first touch for every new page, which landed on
    # whichever peer happened to write next.
    scratch: Path | None = None

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _stop(self) -> None:
        if self.stop_fn is not None:
            self.stop_fn()
            return
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def peak_rss(pid: int) -> int:
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def peak_rss_per_process(pid: int) -> int:
    """The largest peak RSS of one process among `pid` and its descendants (per worker)."""
    largest = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    largest = max(largest, int(line.split()[1]) * 1024)
    return largest


def wait_ready(url: str, proc: subprocess.Popen[bytes], workers: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url, timeout=2) as answer:
                report = json.loads(answer.read())
            states = [w.get("state") for w in report.get("workers", [])]
            if workers == 1 or (len(states) == workers and all(x == "ready" for x in states)):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: not every worker became ready")


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, limit: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Bench:
    def __init__(self, work: Path, tls: bool, big: int, medium: int) -> None:
        self.work = work
        self.tls = tls
        self.storage = work / "upstream"
        self.blobs = seed_storage(self.storage, big, medium)
        self.cert = self.key = None
        if tls:
            import trustme

            ca = trustme.CA()
            server = ca.issue_cert("127.0.0.1", "localhost")
            self.cert, self.key = work / "cert.pem", work / "key.pem"
            server.private_key_and_cert_chain_pem.write_to_path(str(self.cert))
            server.private_key_pem.write_to_path(str(self.key))
            chain = b"".join(b.bytes() for b in server.cert_chain_pems)
            self.cert.write_bytes(chain)
        self.upstream = self._distribution("direct", {}, self.storage, tls=tls)

    # each peer

    def _distribution(self, name: str, extra: dict[str, Any], storage: Path, tls: bool) -> Proc:
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}},
            "http": {"addr": "127.0.0.1:0", "secret": "bench"},
        }
        cfg.update(extra)
        reg = start_registry("docker-registry", self.work / f"log-{name}", name, cfg)
        proc = Proc(name, reg.proc, reg.url, h2c=False, stop_fn=reg.stop, pid=reg.proc.pid)
        proc.access_log = reg.stdout_path  # type: ignore[attr-defined]
        if tls:
            tcfg = {
                **cfg,
                "http": {
                    **cfg["http"],
                    "tls": {"certificate": str(self.cert), "key": str(self.key)},
                },
            }
            treg = start_registry("docker-registry", self.work / f"log-{name}-tls", name, tcfg)
            proc.tls_url = f"https://127.0.0.1:{treg.port}"
            proc._tls = treg  # type: ignore[attr-defined]

            def stop_both() -> None:
                reg.stop()
                treg.stop()

            proc.stop_fn = stop_both
        return proc

    def distribution_proxy(self) -> Proc:
        storage = self.work / f"proxy-{time.monotonic_ns()}"
        proc = self._distribution(
            "distribution-proxy", {"proxy": {"remoteurl": self.upstream.url}}, storage, self.tls
        )
        proc.scratch = storage
        return proc

    def nginx(self, static: bool = False, workers: int = 1) -> Proc:
        d = self.work / f"nginx-{time.monotonic_ns()}"
        d.mkdir()
        p1, p2 = free_port(), free_port()
        pt = free_port()
        up = self.upstream.url.removeprefix("http://")
        if static:
            files = d / "files"
            files.mkdir()
            for blob in self.blobs.values():
                os.symlink(blob.path, files / blob.digest)
            location = f"location /v2/{REPO}/blobs/ {{ alias {files}/; default_type application/octet-stream; }}"
        else:
            location = (
                f"location / {{ proxy_pass http://{up}; proxy_buffering off;"
                ' proxy_http_version 1.1; proxy_set_header Connection ""; }'
            )
        tls = (
            f"server {{ listen 127.0.0.1:{pt} ssl http2; ssl_certificate {self.cert};"
            f" ssl_certificate_key {self.key}; {location} }}"
            if self.tls
            else ""
        )
        conf = d / "nginx.conf"
        conf.write_text(
            f"worker_processes {workers}; pid {d}/nginx.pid; error_log {d}/error.log;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; sendfile on; client_body_temp_path {d}/b; proxy_temp_path {d}/p;"
            f" fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n"
            f"  server {{ listen 127.0.0.1:{p1}; {location} }}\n"
            f"  server {{ listen 127.0.0.1:{p2} http2; {location} }}\n"
            f"  {tls}\n}}\n"
        )
        popen = subprocess.Popen(
            ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(p1, popen)
        proc = Proc(
            "nginx static" if static else "nginx proxy", popen, f"http://127.0.0.1:{p1}", h2c=False
        )
        proc.h2c_url = f"http://127.0.0.1:{p2}"
        proc.tls_url = f"https://127.0.0.1:{pt}" if self.tls else None
        proc.pid = popen.pid
        return proc

    def caddy(self) -> Proc:
        d = self.work / f"caddy-{time.monotonic_ns()}"
        d.mkdir()
        p1, pt = free_port(), free_port()
        up = self.upstream.url.removeprefix("http://")
        tls = (
            f"https://127.0.0.1:{pt} {{\n tls {self.cert} {self.key}\n"
            f" reverse_proxy {up} {{\n  flush_interval -1\n }}\n}}\n"
            if self.tls
            else ""
        )
        (d / "Caddyfile").write_text(
            "{\n admin off\n auto_https off\n skip_install_trust\n storage file_system "
            f"{d}/data\n servers {{\n  protocols h1 h2 h2c\n }}\n}}\n"
            f"http://127.0.0.1:{p1} {{\n reverse_proxy {up} {{\n  flush_interval -1\n }}\n}}\n"
            + tls
        )
        env = {**os.environ, "HOME": str(d), "XDG_DATA_HOME": str(d), "XDG_CONFIG_HOME": str(d)}
        popen = subprocess.Popen(
            ["caddy", "run", "--config", str(d / "Caddyfile"), "--adapter", "caddyfile"],
            stdout=subprocess.DEVNULL, stderr=(d / "caddy.log").open("wb"), env=env, cwd=d,
        )  # fmt: skip
        wait_port(p1, popen)
        proc = Proc("caddy proxy", popen, f"http://127.0.0.1:{p1}", pid=popen.pid)
        proc.tls_url = f"https://127.0.0.1:{pt}" if self.tls else None
        if self.tls:
            wait_port(pt, popen)
        return proc

    def vpsrelay(self, name: str, cache: bool, workers: int = 1) -> Proc:
        d = self.work / f"relay-{time.monotonic_ns()}"
        d.mkdir()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
        env.update(
            PYTHONPATH=str(ROOT),
            VPSRELAY_CACHE__ENABLED="true" if cache else "false",
            VPSRELAY_LOG__LEVEL="warning",
        )
        args = [PY, str(ROOT / "bench" / "relay.py"), "--listen", f"127.0.0.1:{port}",
                "--data-dir", str(d / "data"), "--upstream", f"docker.io={self.upstream.url}",
                "--workers", str(workers)]  # fmt: skip
        if os.environ.get("BENCH_NO_PATCHES"):
            args.append("--no-patches")
        tport = None
        if self.tls:  # the relay's own TLS listener (HTTP/1.1 and h2 by ALPN)
            tport = free_port()
            args += ["--cert", str(self.cert), "--key", str(self.key),
                     "--https-listen", f"127.0.0.1:{tport}",
                     "--http-listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
        popen = subprocess.Popen(
            # The log lives beside the data, not in it: the data is removed when the relay stops.
            args,
            stdout=(self.work / f"{d.name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_port(port, popen)
        if tport:
            wait_port(tport, popen)
        # The port answers as soon as the supervisor binds it; the workers' start-up is
        # not measured: wait until /readyz says every worker is ready.
        wait_ready(f"http://127.0.0.1:{port}/readyz", popen, workers)
        proc = Proc(name, popen, f"http://127.0.0.1:{port}", pid=popen.pid)
        proc.tls_url = f"https://127.0.0.1:{tport}" if tport else None
        proc.data = d / "data"  # type: ignore[attr-defined]
        proc.scratch = d
        return proc


# --- clients


def curl(url: str, proto: str, out_dir: Path | None = None) -> subprocess.Popen[str]:
    flags = {"h1": ["--http1.1"], "h2c": ["--http2-prior-knowledge"], "h2": ["--http2"]}[proto]
    return subprocess.Popen(
        ["curl", "-sS", "-k", *flags, "-H", "Accept: application/vnd.oci.image.manifest.v1+json", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{http_version}", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_clients(urls: list[tuple[str, str]], timeout: float = 300) -> tuple[int, float]:
    started = time.monotonic()
    procs = [curl(url, proto) for url, proto in urls]
    total = 0
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        code, size, _ = out.split()
        if code not in ("200", "206"):
            raise RuntimeError(f"curl got {code}: {err}")
        total += int(size)
    return total, time.monotonic() - started


@dataclass
class Row:
    case: str
    peer: str
    mib_s: float
    cpu_per_gib: float | None
    rss_mib: float | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def measure(proc: Proc, urls: list[tuple[str, str]], case: str, note: str = "") -> Row:
    cpu0 = cpu_seconds(proc.pid) if proc.pid else 0.0
    total, seconds = run_clients(urls)
    cpu = cpu_seconds(proc.pid) - cpu0 if proc.pid else None
    gib = total / GiB
    return Row(case, proc.name, total / MiB / seconds, cpu / gib if cpu is not None else None,
               peak_rss(proc.pid) / MiB if proc.pid else None, note)  # fmt: skip


def blob_url(base: str, blob: Blob) -> str:
    return f"{base}/v2/{REPO}/blobs/{blob.digest}"


def upstream_bytes(bench: Bench, since: int, digest: str) -> int:
    text = bench.upstream.access_log.read_bytes()[since:].decode(errors="replace")  # type: ignore[attr-defined]
    total = 0
    for m in re.finditer(r'"GET (\S+) HTTP/[0-9.]+" (\d{3}) (\d+)', text):
        if digest in m.group(1):
            total += int(m.group(3))
    return total


def head_load(url: str, proto: str, seconds: int) -> dict[str, float]:
    if proto == "h2c":
        # h2load has no HEAD: over h2c the manifest is fetched with GET (a few hundred bytes).
        out = subprocess.run(
            ["h2load", "-D", str(seconds), "-c", "10", "-m", "10", "-t", "1",
             "-H", "accept: application/vnd.oci.image.manifest.v1+json", url],
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
        rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout).group(1))  # type: ignore[union-attr]
        return {"rps": rps, "raw": 0}
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        # wrk waits for a body after HEAD (Content-Length) and stalls: GET the small manifest.
        'wrk.method = "GET"\nwrk.headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c10", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out.stdout)
        assert m, out.stdout
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


# --- the cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=1024, help="MiB of the big blob")
    parser.add_argument("--medium", type=int, default=100, help="MiB of the concurrent blob")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--tls", action="store_true", help="also measure TLS (trustme certs)")
    parser.add_argument("--seconds", type=int, default=5, help="per manifest HEAD load run")
    parser.add_argument("--only", default="", help="comma list: stream,concurrent,uncached,head")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    for tool in ("docker-registry", "nginx", "caddy", "curl", "h2load", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing; see docs/benchmarks.md for the install step")
    work = Path(tempfile.mkdtemp(prefix="vpsrelay-bench-"))
    work.chmod(0o755)  # nginx's worker (not root) reads the blob files for "nginx static"
    rows: list[Row] = []
    procs: list[Proc] = []
    bench = None
    try:
        bench = Bench(work, args.tls, args.big * MiB, args.medium * MiB)
        procs.append(bench.upstream)
        big, medium = bench.blobs["big"], bench.blobs["medium"]
        direct = bench.upstream
        protos = [("h1", "url"), ("h2c", "h2c")] + (
            [("h1-tls", "tls"), ("h2-tls", "tls")] if args.tls else []
        )

        def url_for(proc: Proc, kind: str) -> tuple[str, str] | None:
            if kind == "h1":
                return proc.url, "h1"
            if kind == "h2c":
                if proc.h2c_url:
                    return proc.h2c_url, "h2c"
                return (proc.url, "h2c") if proc.h2c else None
            if proc.tls_url is None:
                return None
            return proc.tls_url, "h1" if kind == "h1-tls" else "h2"

        def start(peer: str) -> Proc:
            p = {
                "direct": lambda: direct,
                "nginx static": lambda: bench.nginx(static=True),
                "nginx proxy": bench.nginx,
                "caddy proxy": bench.caddy,
                "distribution proxy (cold)": bench.distribution_proxy,
                "vpsrelay pass-through": lambda: bench.vpsrelay(
                    "vpsrelay pass-through", cache=False
                ),
                "vpsrelay cold (miss)": lambda: bench.vpsrelay("vpsrelay cold (miss)", cache=True),
                "vpsrelay warm (hit)": lambda: bench.vpsrelay("vpsrelay warm (hit)", cache=True),
            }[peer]()
            p.name = peer
            if p is not direct:
                procs.append(p)
            return p

        peers = ["direct", "nginx static", "nginx proxy", "caddy proxy", "distribution proxy (cold)",
                 "vpsrelay pass-through", "vpsrelay cold (miss)", "vpsrelay warm (hit)"]  # fmt: skip

        def stop(p: Proc) -> None:
            if p is not direct:
                p.stop()
                procs.remove(p)

        if not only or "stream" in only:
            for kind, _ in protos:
                for peer in peers:
                    p = start(peer)
                    try:
                        target = url_for(p, kind)
                        if target is None:
                            continue
                        url = blob_url(target[0], big)
                        if peer == "vpsrelay warm (hit)":
                            run_clients([(blob_url(p.url, big), "h1")])  # fill first
                        rows.append(measure(p, [(url, target[1])], f"1 blob {args.big} MiB {kind}"))
                    finally:
                        stop(p)
                    print(rows[-1], file=sys.stderr, flush=True)

        if not only or "concurrent" in only:
            for peer in peers:
                p = start(peer)
                try:
                    url = blob_url(p.url, medium)
                    if peer == "vpsrelay warm (hit)":
                        run_clients([(url, "h1")])
                    rows.append(measure(p, [(url, "h1")] * args.clients,
                                        f"{args.clients} clients x {args.medium} MiB h1"))  # fmt: skip
                finally:
                    stop(p)
                print(rows[-1], file=sys.stderr, flush=True)

        if not only or "uncached" in only:
            for peer in ["nginx proxy", "distribution proxy (cold)", "vpsrelay cold (miss)"]:
                p = start(peer)
                try:
                    since = direct.access_log.stat().st_size  # type: ignore[attr-defined]
                    row = measure(p, [(blob_url(p.url, medium), "h1")] * args.clients,
                                  f"{args.clients} clients, same uncached {args.medium} MiB h1")  # fmt: skip
                    time.sleep(1.0)  # Distribution writes its access line after the response
                    sent = upstream_bytes(bench, since, medium.digest)
                    row.note = f"upstream bytes {sent / medium.size:.2f}x the blob"
                    row.extra["upstream_ratio"] = sent / medium.size
                    rows.append(row)
                finally:
                    stop(p)
                print(rows[-1], file=sys.stderr, flush=True)

        if not only or "head" in only:
            manifest_url = f"/v2/{REPO}/manifests/latest"
            for peer in ["direct", "nginx proxy", "caddy proxy", "vpsrelay warm (hit)"]:
                p = start(peer)
                try:
                    for kind in ("h1", "h2c"):
                        target = url_for(p, kind)
                        if target is None:
                            continue
                        url = target[0] + manifest_url
                        run_clients([(url, target[1])])  # warm the tag
                        cpu0 = cpu_seconds(p.pid)
                        result = head_load(url, kind, args.seconds)
                        cpu = cpu_seconds(p.pid) - cpu0
                        note = f"{result['rps']:.0f} req/s"
                        if "p50" in result:
                            note += f", p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms"
                        if result.get("errors"):
                            note += f", {result['errors']:.0f} non-2xx"
                        row = Row(f"manifest GET, cached tag {kind}", p.name, 0.0, None,
                                  peak_rss(p.pid) / MiB, note)  # fmt: skip
                        row.extra = {**result, "cpu_share": cpu / args.seconds}
                        rows.append(row)
                        print(rows[-1], file=sys.stderr, flush=True)
                finally:
                    stop(p)
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


def print_table(rows: list[Row]) -> None:
    nginx: dict[str, float] = {}
    for r in rows:
        if r.peer == "nginx proxy":
            nginx[r.case] = r.extra.get("rps", r.mib_s)
    print()
    print(
        "| case | peer | MiB/s or req/s | ratio to nginx proxy | relay CPU s/GiB | peak RSS MiB | note |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        value = r.extra.get("rps", r.mib_s)
        base = nginx.get(r.case)
        ratio = f"{value / base:.2f}" if base else "-"
        cpu = f"{r.cpu_per_gib:.2f}" if r.cpu_per_gib is not None else "-"
        rss = f"{r.rss_mib:.0f}" if r.rss_mib is not None else "-"
        print(f"| {r.case} | {r.peer} | {value:.0f} | {ratio} | {cpu} | {rss} | {r.note} |")


if __name__ == "__main__":
    main()
