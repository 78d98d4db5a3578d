"""Settings of the command line's client commands (`gpuhost run / ps / list / usage`)."""

from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """The `gpuhost run / ps / list / usage` client: which server, with which key."""

    model_config = SettingsConfigDict(env_prefix="GPUHOST_", env_file=".env", extra="ignore")

    host: str = "http://127.0.0.1:8080"
    api_key: str = ""
    timeout_seconds: float = 600.0

    def base_url(self) -> str:
        host = self.host if "://" in self.host else f"http://{self.host}"
        return host.rstrip("/")
