from __future__ import annotations

from vpsrelay.cli import main

main()
