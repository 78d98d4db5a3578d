"""Settings of a gateway process (`gpuhost serve`)."""

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator

from config import Listed, Mapped, ModelSettings

ADMIN_TOKEN_MIN = 32


class GatewaySettings(ModelSettings):
    # Where `gpuhost serve` listens (GPUHOST_HOST is the command line client's server URL).
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    # Serve /metrics on this port, and not on the API's (0: on the API's port, as before). The
    # chart sets it, so that Prometheus scrapes a port the ingress does not publish.
    metrics_port: int = 0
    # Behind reverse proxies: their addresses or networks (CIDRs), whose X-Forwarded-For and
    # X-Forwarded-Proto are believed; a client's address (for throttling and per-address
    # limits) is then the one they name. None by default: the peer's address is the client's.
    trusted_proxies: Listed = Field(default_factory=list)
    # The URL clients reach the service at (https://gpu.example.com): links the gateway hands
    # out (images as URLs) start with it. Empty: the request's own scheme and host.
    public_base_url: str = ""
    # HTTPS: serve TLS with this certificate (chain) and key, both PEM files.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # Largest request body accepted, in bytes (HTTP 413 above it).
    max_body_bytes: int = 20 * 1024 * 1024
    # Uploads (fine-tuning datasets) may be larger, up to this; each tier has its own limit too.
    max_upload_bytes: int = 256 * 1024 * 1024
    # A request without an API key or the admin token (the dashboard's forms, Stripe's events)
    # sends at most this; with one, the key is checked before the body is read
    # (api/guards/limits.py).
    anonymous_max_body_bytes: int = 1024 * 1024
    # A connection sends its request head within this time of opening (or of its next
    # request's first byte), or is closed; one client address holds at most this many
    # connections at once (0: no limit). api/guards/connections.py; trusted proxies are exempt.
    head_timeout_seconds: float = 10.0
    connections_per_client: int = 256
    # A body that pauses this long, or comes slower than this on average after its first 10 s,
    # ends with 408; one client address sends at most this many bodies at once (429 beyond).
    body_idle_seconds: float = 10.0
    body_min_bytes_per_second: float = 16 * 1024
    bodies_per_client: int = 16
    # Job webhooks: networks they may reach besides public addresses (CIDRs, e.g. an
    # internal receiver's); how long a receiver has to answer; attempts before giving up, and
    # the backoff between them (base x 2^(attempt - 1), at most the cap).
    webhook_allowed_networks: Listed = Field(default_factory=list)
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_seconds: float = 5.0
    webhook_backoff_cap_seconds: float = 3600.0
    webhook_poll_seconds: float = 0.5
    # Batches: most lines in one, and how long a finished batch and its output are kept.
    batch_max_lines: int = 10_000
    batch_retention_seconds: int = 7 * 24 * 3600
    # Files (/v1/files): the longest a file is kept, in seconds (an upload may ask for less;
    # 0: until deleted), and how often expired files' bytes are removed.
    file_retention_seconds: int = Field(30 * 24 * 3600, ge=0)
    file_sweep_seconds: float = Field(60.0, gt=0)
    # Fine-tuning: most images in a dataset.
    dataset_max_images: int = 1000
    # Largest image accepted, in pixels (decompression bombs are refused).
    max_image_pixels: int = 4096 * 4096
    # Images are checked (decoded) in threads, at most this many at once per gateway; one
    # tenant's requests use at most its tier's concurrency of them
    # (api/inputs/image_checks.py: Decoder).
    image_check_threads: int = 4
    max_images_per_request: int = 8
    # The side LLaVA's vision tower sees (CLIP ViT-L/14-336: 336): a chat image larger than
    # that is reduced to it here, as the model's processor would, before it is queued
    # (api/inputs/image_checks.py: reduced). 0: images go as they came.
    llava_image_side: int = Field(336, ge=0)
    # Stable Diffusion: largest width or height, images per request by tier, and how long
    # images asked for as URLs can be fetched.
    sd_max_side: int = 1024
    sd_default_side: int = 512  # an image's width and height when the request names neither
    sd_images_per_request: Mapped[int] = Field(
        default_factory=lambda: {"free": 1, "pro": 4, "max": 8}
    )
    image_url_ttl_seconds: int = 3600
    # Stripe webhooks: the endpoint's signing secret, and which price is which tier (a price
    # whose lookup_key names a tier needs no entry).
    stripe_webhook_secret: str = ""
    # Stripe's event destination for thin events (meter error reports): its signing secret
    stripe_events_secret: str = ""
    # PostgreSQL connections a gateway keeps open (as many again for bursts).
    db_pool_size: int = 20
    # A tenant's tier and GPU-seconds used are read at most this often per gateway
    # (api/access/quota.py: only fresh figures refuse a request; a downgrade applies within
    # it; 0 reads every time).
    quota_cache_seconds: float = 1.0
    # The operator's token for /admin/... and the dashboard (empty: the admin API is off); at
    # least 32 characters, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.
    admin_token: str = ""
    stripe_price_tiers: Mapped[str] = Field(default_factory=dict)
    # OpenAI-style image_url parts with http(s) URLs: fetched by the gateway only if enabled,
    # from public addresses only, unless their network is listed here (CIDRs); redirects are
    # not followed (webhooks/targets.py).
    fetch_image_urls: bool = False
    image_url_allowed_networks: Listed = Field(default_factory=list)
    retry_after_seconds: int = 1
    # A synchronous request over its tenant's tier waits up to this long for a slot, in the
    # tenant's queue (the one its async jobs wait in, first come first served), then gets 429
    # (0: 429 at once). At most this many requests and jobs wait per tenant (429 beyond).
    admission_wait_seconds: float = Field(30.0, ge=0)
    admission_queue_length: int = Field(100, ge=1)
    # Keys are looked up at most this often per gateway: a revoked key stops within it.
    auth_cache_seconds: float = 5.0
    # This many failed credentials (API keys, the admin token, dashboard sign-ins) from one
    # client address within the window: its next failures are answered 429 until the window
    # ends. Valid credentials are always checked and never refused (api/guards/throttle.py; 0: off).
    credential_failures_limit: int = 20
    credential_failures_window_seconds: int = 60
    # PostgreSQL out of this gateway's reach: keys and quota figures it read within this many
    # seconds are still trusted (a request already admitted runs on whatever this is); past
    # it, or for a key it has not seen, requests get 503.
    ledger_outage_grace_seconds: float = 60.0
    # When the workers are busy (api/pipeline/fleet.py): a request admitted this long ago
    # starts before any other that came later, whatever its band (in the room it may take); a
    # tenant's served GPU-seconds, by which the tenants of a band take turns, count half after
    # this long.
    fleet_aging_seconds: float = Field(30.0, gt=0)
    fleet_fair_half_life_seconds: float = Field(60.0, gt=0)
    # Of each model's room (its workers' request threads), how many slots the jobs of the
    # lowest plan band (Free) and batch lines leave to the paying plans' jobs, so that a paying
    # job never waits for a free one to end (none where the room is no larger).
    fleet_reserved_slots: int = Field(1, ge=0)
    # A request no worker has picked up within this time fails with 503 (and holds nothing).
    queue_timeout_seconds: float = 120.0
    # A running request that sends nothing for this long fails with 504.
    idle_timeout_seconds: float = 300.0
    # A streaming client that disconnects can resume within this time (GET
    # /api/jobs/{id}/stream); after it, with no one reading, the request is cancelled and its
    # slot freed. The time it ran on is billed. 0: cancel at once.
    resume_grace_seconds: float = 5.0

    @field_validator("trusted_proxies", "webhook_allowed_networks", "image_url_allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"{network!r} is not an address or a network (CIDR, e.g. 10.0.0.0/8)"
                ) from None
        return networks

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: str) -> str:
        if token and len(token) < ADMIN_TOKEN_MIN:
            raise ValueError(
                f"GPUHOST_ADMIN_TOKEN is {len(token)} characters; at least {ADMIN_TOKEN_MIN} "
                "are needed (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return token
