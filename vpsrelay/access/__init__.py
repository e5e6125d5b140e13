"""Who may do what: the request guard (limits, budgets, allow and deny lists) and client
authentication (the relay's own token service and users)."""
