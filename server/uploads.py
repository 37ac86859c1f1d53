"""Receive a request body into a temporary file, chunk by chunk, stopping at a size limit.

Deltas of 7B models are hundreds of MB and fine-tuned checkpoints several GB: they never sit in memory
whole. The file is made inside the store's folder so the registry can move it into place by renaming.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import Request

from .errors import APIError, bad_request


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Upload exceeds the limit of {limit} bytes (server.max_upload_bytes).",
                    code="upload_too_large")


async def receive_to_file(request: Request, folder: Path, limit: int, suffix: str) -> Path:
    """Write the body to a new file in ``folder``; 413 past ``limit`` bytes, 400 when empty.

    The caller owns the returned file (and deletes it once done); on any error here it is already gone.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)  # refuse before reading a byte
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=suffix)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # a chunked body declares no length: count as it comes
                    raise _too_large(limit)
                out.write(chunk)
        if size == 0:
            raise bad_request("The request body is empty: send the file as the body.", code="empty_upload")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
