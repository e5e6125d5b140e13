"""vpsrelay: a container-registry relay for your own server."""

from __future__ import annotations

__version__ = "0.1.0"
