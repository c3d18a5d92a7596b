"""Shards kept in object storage: reading them from a URL prefix instead of the data dir.

``data.shards_url`` names where a prepared data dir was copied: ``s3://bucket/prefix``,
``gs://...``, ``https://host/path`` (any fsspec URL; s3fs/gcsfs for the object stores) or a
WebDataset-style ``pipe:`` command with ``{name}`` standing for the shard's path relative to the
data dir (e.g. ``pipe:aws s3 cp s3://bucket/prefix/{name} -``). The local data dir still holds
manifest.json and the tokenizer (small, needed before any shard); the remote manifest must be
byte-identical to it, every shard listed must be there with the recorded size (where the store can
list sizes) and each shard's sha256 is checked on load, exactly as for local shards. A read that
fails for another reason than "missing" or "forbidden" is retried ``READ_ATTEMPTS`` times with
exponential back-off (object stores answer 500/503 and reset connections now and then).
"""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

READ_ATTEMPTS = 4
BACKOFF_S = 0.5  # then 1 s, 2 s: ~3.5 s of waiting before a read is reported as failed
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


def shard_location(data_dir: str, shards_url: str | None, name: str) -> str:
    """Where the shard ``name`` (relative to the data dir) is read from: a local path or a URL."""
    if not shards_url:
        return str(Path(data_dir) / name)
    if shards_url.startswith("pipe:"):
        return shards_url.replace("{name}", name)
    return f"{shards_url.rstrip('/')}/{name}"


def is_remote(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def read_bytes(location: str) -> bytes:
    """The content of a local file or URL; transient remote errors retried with back-off."""
    if not is_remote(location):
        return Path(location).read_bytes()
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return _read_remote(location)
        except PERMANENT_ERRORS:
            raise
        except Exception as exc:  # fsspec back ends raise their own types (aiohttp, botocore)
            if attempt == READ_ATTEMPTS:
                raise OSError(f"{type(exc).__name__}: {exc} (after {READ_ATTEMPTS} attempts)") from None
            wait = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("reading %s failed (%s: %s); retry %d of %d in %.1f s", _shown(location), type(exc).__name__, exc, attempt, READ_ATTEMPTS - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _read_remote(location: str) -> bytes:
    if location.startswith("pipe:"):
        done = subprocess.run(["bash", "-c", location[len("pipe:"):]], capture_output=True, timeout=600)
        if done.returncode != 0:
            raise OSError(f"command exited with {done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}")
        return done.stdout
    import fsspec

    with fsspec.open(location, "rb") as stream:
        return stream.read()


def remote_sizes(shards_url: str, names: list[str]) -> dict[str, int | None]:
    """Size of each shard at ``shards_url`` (None: absent), by one listing per folder; {} when the
    store cannot list (``pipe:``, plain HTTPS): the sha256 check on load still catches a bad shard."""
    if shards_url.startswith("pipe:"):
        return {}
    import fsspec

    fs, root = fsspec.core.url_to_fs(shards_url)
    sizes: dict[str, int | None] = {}
    for folder in sorted({str(Path(name).parent) for name in names}):
        try:
            listing = {Path(entry["name"]).name: entry.get("size") for entry in fs.ls(f"{root.rstrip('/')}/{folder}", detail=True)}
        except FileNotFoundError:
            listing = {}
        except Exception as exc:  # no listing over this protocol
            log.info("cannot list %s/%s (%s): shard sizes are checked on load", shards_url, folder, exc)
            return {}
        for name in names:
            if str(Path(name).parent) == folder:
                sizes[name] = listing.get(Path(name).name)
    return sizes


def _shown(location: str) -> str:
    return location if len(location) < 200 else location[:200] + "…"
