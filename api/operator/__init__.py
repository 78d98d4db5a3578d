"""The operator's side of the gateway: the admin API (`admin`), probes (`health`), metrics
(`metrics`), and Stripe's webhooks inbound (`stripe_webhooks`)."""
