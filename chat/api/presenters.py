"""Jobs as the /v1 API shows them: OpenAI's completion and chunk objects, and the job object."""

import json
from typing import Any

from chat.api.errors import ApiError, invalid_request, unavailable
from chat.models import Job


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def usage_body(job: Job) -> dict[str, int]:
    prompt, completion = job.prompt_tokens or 0, job.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_body(job: Job) -> dict[str, Any]:
    return {
        "id": job.public_id,
        "object": "chat.completion",
        "created": _ts(job.created_at),
        "model": job.model_alias,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": job.content},
                "finish_reason": job.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_body(job),
    }


def job_error(job: Job) -> ApiError:
    """The error a failed job answers a waiting caller with."""
    if job.error_code == "context_length_exceeded":
        return invalid_request(job.error, param="messages", code=job.error_code)
    if job.error_code == "rejected_by_review":
        return invalid_request(job.error, code=job.error_code)
    return unavailable(job.error or "The model failed to answer.")


def job_body(job: Job) -> dict[str, Any]:
    """The job object: its state; the completion once there is one to show. A held answer is
    not shown until a reviewer has released it."""
    result = None
    if job.status in (Job.Status.COMPLETED, Job.Status.CANCELLED):
        result = completion_body(job)
    error = job_error(job).body()["error"] if job.status == Job.Status.FAILED else None
    if job.status == Job.Status.HELD_FOR_REVIEW:
        error = {"message": job.error, "type": "held_for_review", "param": None, "code": None}
    return {
        "id": job.public_id,
        "object": "job",
        "status": job.status,
        "model": job.model_alias,
        "created_at": _ts(job.created_at),
        "finished_at": _ts(job.finished_at),
        "result": result,
        "error": error,
    }


def chunk_body(
    job: Job, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": job.public_id,
        "object": "chat.completion.chunk",
        "created": _ts(job.created_at),
        "model": job.model_alias,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        **extra,
    }


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"
