"""Whether a tenant's request may run now: its key (`revocations`: revoked keys dropped from
every gateway's caches), its plan's allowance and current tier (`quota`), and a slot in its
tier's lease semaphore (`admission`)."""
