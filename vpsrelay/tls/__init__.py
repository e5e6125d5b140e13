"""HTTPS: certificates from ACME (`certs`), contexts that switch under a running server
(`contexts`), and the TLS listeners with their renewal loop (`serving`)."""
