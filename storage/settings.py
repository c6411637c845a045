"""The one settings object, read from ERQ_* environment variables (documented in the README)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_BROKER_PREFIXES = ("sqla+", "filesystem:", "memory:")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERQ_")

    var_dir: Path = Path("./var")
    database_url: str = "sqlite:///./var/erq.sqlite"
    broker_url: str = "sqla+sqlite:///./var/broker.sqlite"
    artifact_dir: Path = Path("./var/artifacts")
    data_roots: str = "./tests/fixtures"  # colon-separated folders jobs may read
    max_active_jobs_per_key: int = 4
    max_job_seconds: int = 6 * 3600
    lease_seconds: int = 120  # a running job whose worker stays silent this long is re-queued or failed
    max_attempts: int = 2
    queue: str = "erq"

    @property
    def roots(self) -> list[Path]:
        return [Path(p).resolve() for p in self.data_roots.split(":") if p.strip()]

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(EMBEDDED_BROKER_PREFIXES)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def prepare_local_folders(settings: Optional[Settings] = None) -> None:
    """Create ./var and the artifact folder, and the SQLite folders the URLs point into."""
    settings = settings or get_settings()
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    for url in (settings.database_url, settings.broker_url):
        if "sqlite:///" in url:
            Path(url.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
