"""idtoken-proxy: a local authenticating reverse proxy for private Cloud Run services."""

__version__ = "0.1.0"
