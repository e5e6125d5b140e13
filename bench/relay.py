"""`vpsrelay serve` for the benchmarks, with the library tuning switchable.

Every argument goes to `vpsrelay serve` (TLS is the relay's own: `--cert/--key
--https-listen`). `--no-patches` skips `hypercorn_patches` and `httpcore_patches` (no
HTTP/2 write coalescing, no stream reset, 64 KiB upstream reads), to measure what the
tuning is worth in the same run.
"""

from __future__ import annotations

import sys

from vpsrelay import cli
from vpsrelay.patches import httpcore as httpcore_patches, hypercorn as hypercorn_patches


def main() -> None:
    args = sys.argv[1:]
    if "--no-patches" in args:
        args.remove("--no-patches")
        hypercorn_patches.apply = lambda: False  # type: ignore[assignment]
        httpcore_patches.apply = lambda: False  # type: ignore[assignment]
    sys.argv = ["vpsrelay", "serve", *args]
    cli.main()


if __name__ == "__main__":
    main()
