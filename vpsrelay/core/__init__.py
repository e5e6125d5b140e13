"""The sans-IO core: routing, challenge and scope rewriting, header and redirect policy.

Nothing here touches a socket, a file or the clock. It takes and returns frozen
dataclasses and raises only `vpsrelay.errors.RelayError` subclasses; the IO shell
(`vpsrelay.upstream`, `vpsrelay.app`) does the talking.
"""
