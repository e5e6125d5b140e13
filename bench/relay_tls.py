"""`vpsrelay serve`, plus a TLS listener through Hypercorn's own certfile support.

For the benchmarks only, until the relay's TLS (issue 3) lands: `--tls-listen HOST:PORT
--cert PEM --key PEM` add a TLS bind (HTTP/1.1 and h2 by ALPN); every other argument goes
to `vpsrelay serve`, whose `--listen` stays cleartext (HTTP/1.1 and h2c).
"""

from __future__ import annotations

import argparse
import sys

from vpsrelay import cli, server


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tls-listen")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--no-h2-reset", action="store_true", help="skip hypercorn_patches")
    ours, rest = parser.parse_known_args()
    if ours.no_h2_reset:
        from vpsrelay import hypercorn_patches

        hypercorn_patches.apply = lambda: False  # type: ignore[assignment]
    if ours.tls_listen:
        plain = server.hypercorn_config

        def with_tls(settings):  # type: ignore[no-untyped-def]
            config = plain(settings)
            config.insecure_bind = config.bind
            config.bind = [ours.tls_listen]
            config.certfile, config.keyfile = ours.cert, ours.key
            return config

        server.hypercorn_config = with_tls  # type: ignore[assignment]
    sys.argv = ["vpsrelay", "serve", *rest]
    cli.main()


if __name__ == "__main__":
    main()
