"""manifest.json: what `pretrain prepare` wrote, and the checks every reader of the shards runs.

The manifest is written last (atomically), so its presence means the data dir is complete. Readers
check, cheaply, when they open the data dir: the manifest parses and has the expected fields; the
tokenizer file's sha256 equals the manifest's; every shard of the split exists with the recorded
size. Each shard's sha256 is checked when a reader loads that shard (see ``stream.read_shard``).
"""
from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.tokenizer import file_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = 1
REQUIRED_KEYS = ("format", "seq_len", "vocab_size", "tokenizer_file", "tokenizer_sha256", "special_ids", "splits")
PREPARE_HINT = "run `pretrain prepare` with the same config to (re)build it"


def write_manifest(data_dir: str | Path, manifest: dict) -> Path:
    path = Path(data_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_manifest(data_dir: str | Path) -> dict:
    """Parse and sanity-check ``<data_dir>/manifest.json``; errors name the file and the fix."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {data_dir}: the data dir is missing or incomplete; {PREPARE_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); {PREPARE_HINT}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object; {PREPARE_HINT}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; {PREPARE_HINT}")
    if manifest["format"] != FORMAT:
        raise ValueError(f"{path} has format {manifest['format']!r}, this version reads format {FORMAT}; {PREPARE_HINT}")
    for split, entry in manifest["splits"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise ValueError(f"{path}: split {split!r} has no shard list; {PREPARE_HINT}")
    return manifest


def manifest_sha256(data_dir: str | Path) -> str:
    """Fingerprint of the prepared data (stored by later stages to detect a rebuilt data dir)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {data_dir}; {PREPARE_HINT}")
    return file_sha256(path)


def check_tokenizer(data_dir: str | Path, manifest: dict) -> Path:
    """The tokenizer next to the shards must be the one they were made with."""
    path = Path(data_dir) / manifest["tokenizer_file"]
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} named by {Path(data_dir) / MANIFEST_NAME} is missing; {PREPARE_HINT}")
    actual = file_sha256(path)
    if actual != manifest["tokenizer_sha256"]:
        raise ValueError(
            f"tokenizer {path} (sha256 {actual[:12]}…) is not the one the shards were tokenised with "
            f"(manifest says {manifest['tokenizer_sha256'][:12]}…): restore that tokenizer.model, or {PREPARE_HINT}"
        )
    return path


def split_shards(data_dir: str | Path, manifest: dict, split: str) -> list[dict]:
    """The manifest's shard entries of ``split``; an unknown or empty split is an error."""
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {Path(data_dir) / MANIFEST_NAME} (it has {sorted(splits)})")
    shards = splits[split]["shards"]
    if not shards:
        hint = " (data.valid_fraction was 0)" if split == "valid" else ""
        raise ValueError(f"split {split!r} in {data_dir} has no samples{hint}; {PREPARE_HINT}")
    return shards


def missing_or_resized_shards(data_dir: str | Path, shards: list[dict], remote: dict | None = None,
                              recorded_in: str = "the manifest") -> list[str]:
    """Cheap check (one stat per shard, or the sizes a remote listing gave: ``remote``): messages for
    shards that are absent or have the wrong size (against the sizes ``recorded_in`` holds)."""
    problems = []
    for shard in shards:
        if remote is not None:
            if not remote:
                break  # the store cannot list: each shard is checked when it is loaded
            where, size = shard["name"], remote.get(shard["name"])
        else:
            path = Path(data_dir) / shard["name"]
            where, size = path, path.stat().st_size if path.is_file() else None
        if size is None:
            problems.append(f"{where} is missing")
        elif size != shard["bytes"]:
            problems.append(f"{where} has {size} bytes, {recorded_in} says {shard['bytes']} (truncated or rewritten)")
    return problems
