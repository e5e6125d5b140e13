"""`vpsrelay save`: download images as one `docker load` tar from a relay, resumably.

The relay's tar is a pure function of the images, so a partial file is finished with a
`Range` request. The tar's ETag is kept beside the file (`FILE.etag`) while it is
partial and sent as `If-Range`: should the images have changed meanwhile (a tag moved),
the relay answers the whole new tar and the file starts over, instead of being
finished with the bytes of another tar. A file without that stored ETag (another tool's,
or finished earlier) is downloaded again: nothing else tells which tar it is.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING
from urllib.parse import urlencode

import httpx

from vpsrelay import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

CHUNK = 1024 * 1024
PROGRESS_EVERY = 0.25  # seconds between progress lines
TIMEOUT = httpx.Timeout(connect=15.0, read=120.0, write=30.0, pool=15.0)


class SaveError(Exception):
    """Something the user must hear about, in one line."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    length: int
    etag: str


def download_url(relay: str, images: Sequence[str], platform: str | None) -> str:
    params = [("image", image) for image in images]
    if platform:
        params.append(("platform", platform))
    return f"{relay.rstrip('/')}/download?{urlencode(params)}"


def _error(response: httpx.Response) -> SaveError:
    response.read()
    try:
        message = json.loads(response.content)["errors"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        message = response.text.strip()[:300]
    return SaveError(f"the relay answered {response.status_code}: {message}")


def _probe(client: httpx.Client, url: str) -> Target:
    response = client.head(url)
    if response.status_code != 200:
        # A HEAD has no body to explain itself: ask again for the error's words.
        with client.stream("GET", url, headers={"range": "bytes=0-0"}) as failed:
            raise _error(failed)
    length, etag = response.headers.get("content-length"), response.headers.get("etag")
    if length is None or not length.isdigit() or not etag:
        raise SaveError("the relay's answer has no Content-Length or ETag: is it a vpsrelay?")
    return Target(url, int(length), etag)


class Progress:
    """A one-line progress bar on a terminal, a line now and then otherwise."""

    def __init__(self, total: int, start: int, out: IO[str]) -> None:
        self.total, self.done, self.out = total, start, out
        self.began, self.shown = time.monotonic(), 0.0
        self.first = start
        self.tty = out.isatty()

    def add(self, size: int) -> None:
        self.done += size
        now = time.monotonic()
        if now - self.shown >= (PROGRESS_EVERY if self.tty else 5.0):
            self.shown = now
            self.show(now)

    def show(self, now: float, end: str = "") -> None:
        rate = (self.done - self.first) / max(now - self.began, 1e-3)
        share = self.done / self.total if self.total else 1.0
        bar = "#" * int(share * 30)
        line = (
            f"[{bar:<30}] {share:6.1%} {self.done / 2**20:9.1f} of"
            f" {self.total / 2**20:.1f} MiB, {rate / 2**20:6.1f} MiB/s"
        )
        self.out.write(("\r" if self.tty else "") + line + (end or ("" if self.tty else "\n")))
        self.out.flush()

    def finish(self) -> None:
        self.show(time.monotonic(), end="\n")


def save(
    relay: str,
    images: Sequence[str],
    output: Path,
    *,
    platform: str | None = None,
    auth: tuple[str, str] | None = None,
    verify: str | bool = True,
    out: IO[str] = sys.stderr,
) -> int:
    """Download `images` into `output`, finishing a partial `output` if there is one.

    Returns:
        The tar's size.

    Raises:
        SaveError: the relay refused, or the download broke off (run again to resume).
    """
    url = download_url(relay, images, platform)
    etag_file = output.with_name(output.name + ".etag")
    headers = {"user-agent": f"vpsrelay-save/{__version__}", "accept": "application/json"}
    with httpx.Client(
        auth=auth, verify=verify, timeout=TIMEOUT, headers=headers, follow_redirects=False
    ) as client:
        target = _probe(client, url)
        have = output.stat().st_size if output.exists() else 0
        known = etag_file.read_text().strip() if etag_file.exists() else None
        # A partial file is finished only when its stored ETag says it is of this tar; a
        # file without one (another tool's, or a finished file of another tar) starts over.
        if have and known != target.etag:
            have = 0
        if have == target.length:
            etag_file.unlink(missing_ok=True)
            out.write(f"{output}: complete already ({have} bytes)\n")
            return have
        if have > target.length:
            have = 0
        etag_file.write_text(target.etag + "\n")
        request_headers = {}
        if have:
            request_headers = {"range": f"bytes={have}-", "if-range": target.etag}
        try:
            with client.stream("GET", url, headers=request_headers) as response:
                if response.status_code == 200:
                    have = 0
                elif response.status_code != 206:
                    raise _error(response)
                if response.headers.get("etag") != target.etag:
                    raise SaveError("the images changed while downloading: run again")
                progress = Progress(target.length, have, out)
                with output.open("r+b" if have else "wb") as file:
                    file.seek(have)
                    file.truncate()
                    for chunk in response.iter_raw(CHUNK):
                        file.write(chunk)
                        progress.add(len(chunk))
                progress.finish()
        except httpx.HTTPError as exc:
            raise SaveError(
                f"download interrupted ({exc}): run the same command to resume"
            ) from None
        size = output.stat().st_size
        if size != target.length:
            raise SaveError(
                f"download ended at {size} of {target.length} bytes: run the same command to resume"
            )
        etag_file.unlink(missing_ok=True)
        return size
