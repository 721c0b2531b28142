"""The stores on their own: a file:// directory and a real redis-server. Absent keys read as
None, a write replaces a value whole, every failure surfaces as StoreError (never an OSError
or a Redis exception) and within the timeout, and a URL that cannot name a store is a
ValueError naming kv_store."""
from __future__ import annotations

import os
import threading
import time

import pytest
from kv_store_helpers import sleep_redis
from redis_service import redis_server  # noqa: F401 (a fixture)

from tandem.kv_store.stores import FileStore, RedisStore, StoreError, open_store

KEY = "tandem:kv:v1:" + "f" * 32 + ":" + "0123456789abcdef" * 4
OTHER = "tandem:kv:v1:" + "f" * 32 + ":" + "fedcba9876543210" * 4


@pytest.fixture
def file_store(tmp_path) -> FileStore:
    store = open_store(f"file://{tmp_path}/store", 1.0)
    assert isinstance(store, FileStore)
    return store


def stray_files(root) -> list[str]:
    return [name for _, _, names in os.walk(root) for name in names if name.startswith(".tmp-")]


def test_file_store_reads_what_it_wrote(file_store):
    assert file_store.get_many([KEY, OTHER]) == [None, None]
    file_store.put(KEY, b"one")
    assert file_store.get_many([KEY, OTHER, KEY]) == [b"one", None, b"one"]
    file_store.put(OTHER, b"\0" * 100_000)
    assert file_store.get_many([OTHER, KEY]) == [b"\0" * 100_000, b"one"]
    file_store.put(KEY, b"two")  # replaces
    assert file_store.get_many([KEY]) == [b"two"]
    assert file_store.get_many([]) == []
    file_store.put_many([(KEY, b"three"), (OTHER, b"four")])
    assert file_store.get_many([KEY, OTHER]) == [b"three", b"four"]
    assert not stray_files(file_store.root)
    file_store.close()


def test_file_store_fans_keys_out_over_subdirectories(file_store):
    file_store.put(KEY, b"a")
    file_store.put(OTHER, b"b")
    subdirs = sorted(p.name for p in file_store.root.iterdir())
    assert subdirs == ["10", "ef"]  # the last two hex digits of each block hash
    # A second store on the same directory (another replica) sees the same values.
    again = open_store(f"file://{file_store.root}", 1.0)
    assert again.get_many([OTHER, KEY]) == [b"b", b"a"]


def test_file_store_accepts_localhost_and_quoted_paths(tmp_path):
    store = open_store(f"file://localhost{tmp_path}/with%20space", 1.0)
    store.put(KEY, b"x")
    assert (tmp_path / "with space").is_dir()
    assert store.get_many([KEY]) == [b"x"]


def test_file_store_readers_never_see_half_a_value(file_store):
    # Values are replaced by rename: a reader racing a writer gets one whole value or the
    # other, never a mix or a short read.
    a, b = b"a" * 1_000_000, b"b" * 1_000_000
    file_store.put(KEY, a)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(100):
                file_store.put(KEY, b if i % 2 == 0 else a)
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
        finally:
            stop.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not stop.is_set() or reads == 0:
        value = file_store.get_many([KEY])[0]
        assert value in (a, b), (len(value), value[:1], value[-1:])
        reads += 1
    writer.join()
    assert not errors
    assert not stray_files(file_store.root)


def test_file_store_that_cannot_write_raises_store_error(file_store):
    # Root ignores permissions, so make the key's fan-out directory a regular file instead.
    blocked = file_store.root / KEY[-2:]
    blocked.write_bytes(b"not a directory")
    with pytest.raises(StoreError, match="write failed") as e:
        file_store.put(KEY, b"value")
    assert file_store.url in str(e.value)
    with pytest.raises(StoreError, match="read failed"):
        file_store.get_many([KEY])
    # Other keys are unaffected.
    file_store.put(OTHER, b"fine")
    assert file_store.get_many([OTHER]) == [b"fine"]
    assert blocked.read_bytes() == b"not a directory"
    assert not stray_files(file_store.root)


def test_file_store_on_a_file_is_a_config_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^kv_store: cannot use"):
        open_store(f"file://{tmp_path}/file", 1.0)


@pytest.mark.parametrize("url", [
    "ftp://host/dir", "s3://bucket/prefix", "/just/a/path", "", "file://host/dir", "file://",
    "file:", "redis://", "redis:///0", "redis://:6379/0", "redis://127.0.0.1:notaport/0",
])
def test_urls_that_name_no_store_are_value_errors_naming_kv_store(url):
    with pytest.raises(ValueError, match=r"^kv_store: "):
        open_store(url, 1.0)


def test_redis_url_opens_a_redis_store_without_connecting():
    # Nothing listens on port 1: opening succeeds (the engine starts even if the store is
    # down), and the first call fails as a StoreError.
    store = open_store("redis://127.0.0.1:1/0", 0.5)
    assert isinstance(store, RedisStore) and store.url == "redis://127.0.0.1:1/0"
    with pytest.raises(StoreError, match="127.0.0.1:1"):
        store.get_many([KEY])
    store.close()


def test_redis_store_reads_what_it_wrote(redis_server):  # noqa: F811
    store = open_store(redis_server.url, 1.0)
    assert isinstance(store, RedisStore)
    assert store.get_many([KEY, OTHER]) == [None, None]
    big = os.urandom(737_280)  # one float32 SmolLM2 block
    store.put(KEY, big)
    store.put(OTHER, b"small")
    assert store.get_many([OTHER, KEY, "absent"]) == [b"small", big, None]
    store.put(KEY, b"replaced")
    assert store.get_many([KEY]) == [b"replaced"]
    assert redis_server.client().get(KEY) == b"replaced"  # under the key itself, as is
    store.put_many([(OTHER, big), (KEY, b"piped")])  # one pipelined round trip
    assert store.get_many([KEY, OTHER]) == [b"piped", big]
    store.close()


def test_redis_store_down_fails_fast_and_recovers(redis_server):  # noqa: F811
    store = open_store(redis_server.url, 0.5)
    store.put(KEY, b"before")
    redis_server.kill()
    for call in (lambda: store.get_many([KEY]), lambda: store.put(KEY, b"x"),
                 lambda: store.put_many([(KEY, b"x"), (OTHER, b"y")])):
        start = time.monotonic()
        with pytest.raises(StoreError, match=f"127.0.0.1:{redis_server.port}"):
            call()
        # Bounded by the timeout: no retries with backoff hidden in the client.
        assert time.monotonic() - start < 2.0
    redis_server.start()  # back, empty (nothing is saved to disk)
    assert store.get_many([KEY]) == [None]
    store.put(KEY, b"after")
    assert store.get_many([KEY]) == [b"after"]
    store.close()


def test_redis_store_slow_call_times_out_and_the_next_one_is_not_confused(
        redis_server):  # noqa: F811
    store = open_store(redis_server.url, 0.3)
    store.put(KEY, b"key")
    store.put(OTHER, b"other")
    sleeper = sleep_redis(redis_server, 2)
    start = time.monotonic()
    with pytest.raises(StoreError):
        store.get_many([KEY])
    assert time.monotonic() - start < 1.5  # the socket timeout, not the 2 s sleep
    sleeper.join(10)
    # The late reply to the abandoned call must not be taken as the answer to this one.
    assert store.get_many([OTHER]) == [b"other"]
    assert store.get_many([KEY, OTHER]) == [b"key", b"other"]
    store.close()
