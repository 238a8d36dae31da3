"""The model store: one directory per version under settings.MODEL_STORE, weights as safetensors."""

import hashlib
from pathlib import Path

HASH_FILE = "artifact.sha256"


def store_root() -> Path:
    # Imported here so that the engine (which needs only `artifact_sha256`) runs without Django.
    from django.conf import settings

    return Path(settings.MODEL_STORE)


def artifact_dir(artifact_path: str) -> Path:
    return store_root() / artifact_path


def artifact_sha256(directory: Path) -> str:
    """sha256 over every weight file, in name order, names included."""
    digest = hashlib.sha256()
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {directory}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while chunk := fh.read(8 * 1024 * 1024):
                digest.update(chunk)
    return digest.hexdigest()


def recorded_sha256(directory: Path) -> str | None:
    """The hash written at import time, so re-registering a stored artifact needs no rehash."""
    path = directory / HASH_FILE
    return path.read_text().strip() if path.exists() else None
