"""Inference backends behind one interface: `backend_for(version)`.

`transformers` runs the model in this worker (models_admin.engine); `openai-compatible` streams
from a remote server over HTTP. Both count tokens, render chat prompts and generate with the same
callbacks, so routing and resilience treat them alike.
"""

from models_admin.backends.base import Backend, Prompt, Tokenizing
from models_admin.models import ModelVersion


def backend_for(version: ModelVersion) -> Backend:
    if version.backend == ModelVersion.Backend.OPENAI_COMPATIBLE:
        from models_admin.backends.openai_compatible import remote_backend_get

        return remote_backend_get(version)
    from models_admin.backends.local import local_backend_get

    return local_backend_get(version)


__all__ = ["Backend", "Prompt", "Tokenizing", "backend_for"]
