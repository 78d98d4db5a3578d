"""GPU workers: Celery processes that keep models resident and run requests.

Only `workers.contract` is imported by the gateway; it must import without torch.
"""
