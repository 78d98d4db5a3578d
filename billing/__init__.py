"""The ledger: tenants, API keys and usage records in PostgreSQL.

`billing` owns the database. It imports nothing from `api` or `workers`.
"""
