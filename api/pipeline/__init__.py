"""The job path: how an admitted request becomes work on a worker and comes back.

Every API family, async jobs (`/v1/jobs`) and batch lines go the same way:

- `submit`: the one path from an admitted request to a Celery message: a slot for the job (its
  metadata written in the same Lua step), then the message; and `Job`, the handle a
  synchronous request holds until its end (relayed chunk by chunk, or gathered).
- `stream`: the one reader of a job's chunk stream: follow from any chunk, wait for it to
  settle, or take a snapshot; it notices a dead worker, a silent model and a job no worker
  took.
- `store`: the records kept for jobs and batches in Redis (key names: `workers.keyspace`).
- `view`: what an async job looks like to its tenant, from its record and its stream.
- `scheduler` and `batch_runner`: every gateway's background passes that take waiting jobs
  and batch lines into slots, keep their leases, and record their webhook events.

The routers above it: `api/deferred/jobs.py` (/v1/jobs), `api/deferred/batches.py` (/v1/batches),
`api/deferred/resume.py` (GET /api/jobs/{id}/stream), and the families' serving classes.
"""
