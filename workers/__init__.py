"""GPU workers: Celery processes that keep a model resident and run requests.

The gateway imports only `workers.contract` (tasks, queues, jobs and chunks) and
`workers.keyspace` (Redis keys and scripts); both import without torch.
"""
