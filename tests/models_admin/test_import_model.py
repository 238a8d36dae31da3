"""`manage.py import_model`: artifacts into the store with their hash; the hash guards the load."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command
from django.test import override_settings
from safetensors.torch import save_file

from governance.models import AuditEvent
from models_admin.engine import ArtifactHashMismatch, engine_get
from models_admin.models import ModelVersion
from models_admin.store import HASH_FILE, artifact_dir, artifact_sha256

pytestmark = pytest.mark.django_db


@pytest.fixture
def store(tmp_path: Path, weights_dir: Path):  # type: ignore[no-untyped-def]
    """A store of the test's own (after `weights_dir` has read the real one)."""
    with override_settings(MODEL_STORE=tmp_path / "store"):
        yield tmp_path / "store"


@pytest.fixture
def weights_dir(tmp_path: Path, model_artifact) -> Path:  # type: ignore[no-untyped-def]
    """A small safetensors directory: the real model's config, made-up weights."""
    source = tmp_path / "finetune"
    source.mkdir()
    shutil.copy(artifact_dir(model_artifact.artifact_path) / "config.json", source)
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, str(source / "model.safetensors"))
    return source


def test_a_safetensors_directory_is_copied_into_the_store_with_its_hash_and_lineage(
    store: Path, weights_dir: Path, model_artifact
) -> None:  # type: ignore[no-untyped-def]
    call_command(
        "import_model",
        str(weights_dir),
        "--name",
        "SmolLM2-135M-Instruct",
        "--model-version",
        "base",
    )
    call_command(
        "import_model",
        str(weights_dir),
        "--name",
        "SmolLM2-135M-Instruct",
        "--model-version",
        "ft-1",
        "--parent",
        "SmolLM2-135M-Instruct@base",
        "--base-model",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--training-data",
        "s3://datasets/support-2026-10",
        "--training-params",
        json.dumps({"epochs": 2, "lr": 2e-5}),
    )
    version = ModelVersion.objects.get(version="ft-1")
    stored = store / "SmolLM2-135M-Instruct" / "ft-1"
    assert version.stage == "draft" and version.artifact_path == "SmolLM2-135M-Instruct/ft-1"
    assert version.sha256 == artifact_sha256(weights_dir) == artifact_sha256(stored)
    assert (stored / HASH_FILE).read_text().strip() == version.sha256
    assert version.parent == ModelVersion.objects.get(version="base")
    assert version.training_params == {"epochs": 2, "lr": 2e-5}
    assert version.training_data == "s3://datasets/support-2026-10"
    assert AuditEvent.objects.filter(
        action="model_version.registered", target_id=str(version.pk)
    ).exists()


def test_weights_changed_after_the_import_are_refused_at_load(
    store: Path, weights_dir: Path
) -> None:
    call_command("import_model", str(weights_dir), "--name", "tampered", "--model-version", "v1")
    version = ModelVersion.objects.get(model__name="tampered")
    stored = store / "tampered" / "v1"
    save_file({"w": torch.zeros(1024)}, str(stored / "model.safetensors"))
    with pytest.raises(ArtifactHashMismatch, match="refusing to serve them"):
        engine_get(directory=stored, sha256=version.sha256)


def test_bad_sources_and_names_are_refused_with_the_reason(
    store: Path, weights_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(CommandError, match=r"neither a \.gguf file nor a safetensors"):
        call_command(
            "import_model", str(tmp_path / "nothing"), "--name", "m", "--model-version", "v"
        )
    with pytest.raises(CommandError, match="may hold letters"):
        call_command(
            "import_model", str(weights_dir), "--name", "m", "--model-version", "../escape"
        )
    with pytest.raises(CommandError, match="not JSON"):
        call_command(
            "import_model", str(weights_dir), "--name", "m", "--model-version", "v",
            "--training-params", "{oops",
        )  # fmt: skip
    call_command("import_model", str(weights_dir), "--name", "m", "--model-version", "v")
    save_file({"w": torch.ones(8)}, str(weights_dir / "model.safetensors"))
    with pytest.raises(CommandError, match="already holds other weights"):
        call_command("import_model", str(weights_dir), "--name", "m", "--model-version", "v")
    assert ModelVersion.objects.filter(model__name="m").count() == 1
