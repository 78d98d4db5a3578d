"""Settings of a gateway process (`gpuhost serve`)."""

from pathlib import Path

from pydantic import Field

from billing.settings import ModelSettings


class GatewaySettings(ModelSettings):
    # Where `gpuhost serve` listens (GPUHOST_HOST is the command line client's server URL).
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    # HTTPS: serve TLS with this certificate (chain) and key, both PEM files.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # Largest request body accepted, in bytes (HTTP 413 above it).
    max_body_bytes: int = 20 * 1024 * 1024
    # Uploads (fine-tuning datasets) may be larger, up to this; each tier has its own limit too.
    max_upload_bytes: int = 256 * 1024 * 1024
    # Job webhooks: networks they may reach besides public addresses (CIDRs, e.g. an
    # internal receiver's); how long a receiver has to answer; attempts before giving up, and
    # the backoff between them (base x 2^(attempt - 1), at most the cap).
    webhook_allowed_networks: list[str] = Field(default_factory=list)
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_seconds: float = 5.0
    webhook_backoff_cap_seconds: float = 3600.0
    webhook_poll_seconds: float = 0.5
    # Batches: most lines in one, and how long a finished batch and its output are kept.
    batch_max_lines: int = 10_000
    batch_retention_seconds: int = 7 * 24 * 3600
    # Fine-tuning: most images in a dataset.
    dataset_max_images: int = 1000
    # Largest image accepted, in pixels (decompression bombs are refused).
    max_image_pixels: int = 4096 * 4096
    max_images_per_request: int = 8
    # Stable Diffusion: largest width or height, images per request by tier, and how long
    # images asked for as URLs can be fetched.
    sd_max_side: int = 1024
    sd_images_per_request: dict[str, int] = Field(
        default_factory=lambda: {"free": 1, "pro": 4, "max": 8}
    )
    image_url_ttl_seconds: int = 3600
    # Stripe webhooks: the endpoint's signing secret, and which price is which tier (a price
    # whose lookup_key names a tier needs no entry).
    stripe_webhook_secret: str = ""
    # PostgreSQL connections a gateway keeps open (as many again for bursts).
    db_pool_size: int = 20
    # A tenant's tier and GPU-seconds used are read at most this often per gateway (api/quota.py:
    # only fresh figures refuse a request; a downgrade applies within it; 0 reads every time).
    quota_cache_seconds: float = 1.0
    # The operator's token for /admin/... (empty: the admin API is off).
    admin_token: str = ""
    stripe_price_tiers: dict[str, str] = Field(default_factory=dict)
    # OpenAI-style image_url parts with http(s) URLs: fetched by the gateway only if enabled.
    fetch_image_urls: bool = False
    retry_after_seconds: int = 1
    # Keys are looked up at most this often per gateway: a revoked key stops within it.
    auth_cache_seconds: float = 5.0
    # PostgreSQL out of this gateway's reach: keys and quota figures it read within this many
    # seconds are still trusted (a request already admitted runs on whatever this is); past
    # it, or for a key it has not seen, requests get 503.
    ledger_outage_grace_seconds: float = 60.0
    # A request no worker has picked up within this time fails with 503 (and holds nothing).
    queue_timeout_seconds: float = 120.0
    # A running request that sends nothing for this long fails with 504.
    idle_timeout_seconds: float = 300.0
    # A streaming client that disconnects can resume within this time (GET
    # /api/jobs/{id}/stream); after it, with no one reading, the request is cancelled and its
    # slot freed. The time it ran on is billed. 0: cancel at once.
    resume_grace_seconds: float = 5.0
