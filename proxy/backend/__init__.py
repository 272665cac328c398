"""Upstream (server-side) PostgreSQL connections."""
