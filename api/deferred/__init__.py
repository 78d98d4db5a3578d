"""Work that outlives the request that asked for it: asynchronous jobs (`jobs`, /v1/jobs),
their webhooks (`webhooks`), JSONL batches (`batches`), resumed streams (`resume`), and
fine-tuning (`fine_tuning`). They run on the same job path as every request (`api.pipeline`)."""
