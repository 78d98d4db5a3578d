"""Webhooks of asynchronous jobs: events recorded, delivered signed, retried, refused when
they would reach an address the operator has not allowed."""
