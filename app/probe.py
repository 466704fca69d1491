"""``python -m app.probe``: exit 0 when the local service is ready, 1 otherwise. The container's
HEALTHCHECK; standard library only (the slim image has no curl)."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from app.config import Settings

TIMEOUT_SECONDS = 4
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def readiness_url(settings: Settings) -> str:
    host = WILDCARD_HOSTS.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/health/ready"


def main() -> int:
    try:
        with urllib.request.urlopen(readiness_url(Settings()), timeout=TIMEOUT_SECONDS) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
