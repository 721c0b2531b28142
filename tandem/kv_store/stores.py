"""Shared stores of KV blocks, behind one small interface: `redis://` and `file://`.

Every call is bounded: Redis by socket timeouts, the file store by the disk (and, like every
store, by the caller's deadline in tiers.py). Any failure surfaces as StoreError, which the
caller counts and feeds to its circuit breaker; nothing here retries.
"""
from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlparse


class StoreError(Exception):
    """The store could not be reached or refused the operation."""


class KVStore(ABC):
    url: str

    @abstractmethod
    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Values of `keys`, None where a key is absent."""

    @abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`, replacing any value there."""

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store several values (a step's blocks): one round trip where the store allows."""
        for key, value in items:
            self.put(key, value)

    def close(self) -> None:
        """Release connections."""


class FileStore(KVStore):
    """One file per block under a directory, on local disk or a shared file system. A write
    goes to a temporary file first and is renamed into place, so a reader never sees half a
    value (rename is atomic within a file system)."""

    def __init__(self, url: str, directory: str):
        self.url, self.root = url, Path(directory)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"kv_store: cannot use {directory!r} as a store directory: {e}")

    def _path(self, key: str) -> Path:
        # Keys are ASCII with ':' separators; the last part (the block hash) fans out the
        # files over 256 subdirectories so no directory holds millions of entries.
        name = key.replace(":", "_")
        return self.root / name[-2:] / name

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self._path(key).read_bytes())
            except FileNotFoundError:
                out.append(None)
            except OSError as e:
                raise StoreError(f"{self.url}: read failed: {e}") from None
        return out

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(value)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            raise StoreError(f"{self.url}: write failed: {e}") from None


class RedisStore(KVStore):
    def __init__(self, url: str, timeout: float):
        import redis  # only a store that uses it needs the package

        self.url = url
        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        try:
            return self.client.mget(keys)  # one round trip for a whole chain
        except self._errors as e:
            raise StoreError(f"{self.url}: {e}") from None

    def put(self, key: str, value: bytes) -> None:
        try:
            self.client.set(key, value)
        except self._errors as e:
            raise StoreError(f"{self.url}: {e}") from None

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value)
            pipe.execute()
        except self._errors as e:
            raise StoreError(f"{self.url}: {e}") from None

    def close(self) -> None:
        self.client.close()


def open_store(url: str, timeout: float) -> KVStore:
    """The store a `--kv-store` URL names; ValueError naming the field if it cannot be one."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise ValueError(f"kv_store: a file store is file:///absolute/dir, got {url!r}")
        return FileStore(url, unquote(parsed.path))
    if parsed.scheme in ("redis", "rediss"):
        if not parsed.hostname:
            raise ValueError(f"kv_store: a Redis store is redis://host:port[/db], got {url!r}")
        try:
            return RedisStore(url, timeout)
        except ValueError as e:
            raise ValueError(f"kv_store: {e}") from None
    raise ValueError(f"kv_store: unsupported scheme in {url!r}; use redis://host:port[/db] or "
                     f"file:///dir")
