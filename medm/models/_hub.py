"""Fail at once, naming the setting, when a model named by hub id is not on disk and the hub cannot be reached.

Without this, transformers retries the download for about a minute without network and then raises an `OSError`
that names neither the setting nor the fix.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from medm.config import ConfigError

__all__ = ["hub_unreachable", "require_available"]

_TRUE = {"1", "true", "yes", "on"}


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, or no connection), or None when it can."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    from huggingface_hub import constants  # defers huggingface_hub

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"no connection to {host}: {e.strerror or e}"


def require_available(path: str | None, key: str, filename: str = "config.json") -> None:
    """Check that `path` (the value of setting `key`) is a local directory, a hub id already in the local cache, or
    a hub id that can be downloaded now.

    Raises:
        ConfigError: naming `key`, the path and the fix.
    """
    if not path or os.path.exists(path):
        return
    from huggingface_hub import try_to_load_from_cache  # defers huggingface_hub
    from huggingface_hub.errors import HFValidationError  # defers huggingface_hub

    try:
        cached = try_to_load_from_cache(path, filename)
    except HFValidationError:
        raise ConfigError(f"{key}: {path!r} is not a directory (nor a hub id); set {key} to the model's "
                          "directory") from None
    if isinstance(cached, str):
        return
    reason = hub_unreachable()
    if reason is not None:
        raise ConfigError(f"{key}: {path!r} is not a local directory nor in the Hugging Face cache, and the hub "
                          f"cannot be reached ({reason}); download it where there is network (hf download {path}) "
                          f"and set {key} to that directory (or HF_HOME to that cache)")
