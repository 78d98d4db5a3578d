"""Settings of a gateway process (`gpuhost serve`)."""

from billing.settings import ModelSettings


class GatewaySettings(ModelSettings):
    host: str = "127.0.0.1"
    port: int = 8080
    # Largest request body accepted, in bytes (HTTP 413 above it).
    max_body_bytes: int = 20 * 1024 * 1024
    # Largest image accepted, in pixels (decompression bombs are refused).
    max_image_pixels: int = 4096 * 4096
    max_images_per_request: int = 8
    # A slot is a lease: a gateway that dies returns its tenants' slots within this time.
    lease_ttl_seconds: float = 30.0
    retry_after_seconds: int = 1
    # Keys are looked up at most this often per gateway: a revoked key stops within it.
    auth_cache_seconds: float = 5.0
    # A request no worker has picked up within this time fails with 503 (and holds nothing).
    queue_timeout_seconds: float = 120.0
    # A running request that sends nothing for this long fails with 504.
    idle_timeout_seconds: float = 300.0
