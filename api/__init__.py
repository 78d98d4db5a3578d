"""The gateway (FastAPI): one process of any number of replicas.

Its frame is here (`app`, `state`, `settings`, `deps`, `errors`); what runs before a route in
`guards/`; whether a request may run in `access/`; what requests carry in `inputs/`; the one
job path every request takes in `pipeline/`; the API families in `ollama/`, `openai/` and
`sd/`; work that outlives its request in `deferred/`; a tenant's own account in `account`;
the operator's side in `operator/`; the pages in `dashboard/` and `docs_page/`.

It imports `billing`, `workers.contract` and `workers.keyspace`, and the torch-free domain
packages (`tuning`, `webhooks`, `storage`); never model code, torch or the command line.
"""
