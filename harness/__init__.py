"""The harness the tests and the benchmarks share: the servers they run against
(`services`), real gateway, worker, Redis and RabbitMQ processes (`processes`), a TCP proxy
to cut (`proxy`), a Stripe-compatible server (`stripe_server`), small helpers (`helpers`) and
the chaos load with its stack and report (`chaos/`). It imports the product's packages; the
product never imports it, and neither `tests/` nor `bench/` imports the other."""
