"""What the operator sees and runs: metrics, health, the access log and log format, the
page at `/`, the operator paths, and the `check` and `healthcheck` commands."""
