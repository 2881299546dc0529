"""The image endpoint for curl: POST /v1/models/NAME:classify with the images as multipart form fields
(`-F image=@cat.jpg`, several allowed) or one image as the whole body (`--data-binary @cat.jpg` with an image/*
or application/octet-stream Content-Type). top_k, version and alias come as form fields or query parameters.
The call is a fovea.v1 ClassifyRequest, answered through the same path as gRPC's Classify."""

from __future__ import annotations

from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from fovea.errors import InvalidArgument
from fovea.v1 import image_pb2

IMAGE_FIELDS = ("image", "images", "file")
OPTION_FIELDS = ("top_k", "version", "alias")
MAX_OPTION_BYTES = 100
MAX_FILENAME = 200
CHUNK = 64 * 1024


async def read_request(
    request: web.Request, model: str, max_images: int, max_image_bytes: int, max_body: int
) -> image_pb2.ClassifyRequest:
    """The ClassifyRequest from the body: images counted and sized as they arrive, so that a call over the
    limits (per image, and max_body in all: a chunked body has no Content-Length to check first) is refused
    before the rest of it is read."""
    options: dict[str, str] = {k: v for k, v in request.query.items() if k in OPTION_FIELDS}
    unknown = sorted(set(request.query) - set(OPTION_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown query parameter {unknown[0][:40]!r}; expected {', '.join(OPTION_FIELDS)}")
    req = image_pb2.ClassifyRequest(model=model)
    if request.content_type.startswith("multipart/"):
        try:
            await _read_form(request, req, options, max_images, max_image_bytes, max_body)
        except (ValueError, TypeError, RuntimeError, HttpProcessingError) as exc:  # aiohttp's multipart parser
            raise InvalidArgument(f"the multipart body is malformed: {str(exc)[:200]}") from None
    elif request.content_type.startswith("image/") or request.content_type == "application/octet-stream":
        req.images.add(id="0", data=await _read_part(request.content, min(max_image_bytes, max_body), "the image"))
    else:
        raise InvalidArgument(
            "send images as multipart/form-data fields named 'image' (curl -F image=@cat.jpg), or one image as "
            f"the body with an image/* Content-Type; got Content-Type {request.content_type[:60]!r}"
        )
    if not req.images:
        raise InvalidArgument("no images: send at least one form field named 'image' (curl -F image=@cat.jpg)")
    req.top_k = _number(options.get("top_k", ""), "top_k", 1_000_000)
    req.version = _number(options.get("version", ""), "version", 10**18)
    req.alias = options.get("alias", "")
    return req


async def _read_form(
    request: web.Request,
    req: image_pb2.ClassifyRequest,
    options: dict[str, str],
    max_images: int,
    max_bytes: int,
    max_body: int,
) -> None:
    reader = await request.multipart()
    total = 0
    while True:
        part = await reader.next()
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise InvalidArgument("nested multipart bodies are not accepted: send each image as its own field")
        if part.name in IMAGE_FIELDS:
            if len(req.images) >= max_images:
                raise InvalidArgument(f"more than {max_images} images in one call; the limit is {max_images}")
            index = len(req.images)
            if total + max_bytes > max_body:  # this image may not take the call past the body limit
                data = await _read_part(part, max_body - total, f"the body (at image {index})")
            else:
                data = await _read_part(part, max_bytes, f"image {index}")
            total += len(data)
            req.images.add(id=(part.filename or str(index))[:MAX_FILENAME], data=data)
        elif part.name in OPTION_FIELDS:
            value = await _read_part(part, MAX_OPTION_BYTES, f"field {part.name}")
            total += len(value)
            options[part.name] = value.decode("utf-8", "replace").strip()
        else:
            raise InvalidArgument(
                f"unknown form field {str(part.name)[:40]!r}; expected {', '.join(IMAGE_FIELDS + OPTION_FIELDS)}"
            )


async def _read_part(source: Any, limit: int, what: str) -> bytes:
    """A part's bytes, refused as soon as it passes the limit (not after reading all of it)."""
    data = bytearray()
    while True:
        chunk = await source.read_chunk(CHUNK) if isinstance(source, BodyPartReader) else await source.read(CHUNK)
        if not chunk:
            return bytes(data)
        if len(data) + len(chunk) > limit:
            raise InvalidArgument(f"{what} is over {limit} bytes, the limit")
        data.extend(chunk)


def _number(text: str, name: str, limit: int) -> int:
    if not text:
        return 0
    if len(text) > 19 or not text.isascii() or not text.isdigit() or int(text) > limit:
        raise InvalidArgument(f"{name} must be a positive whole number, got {text[:40]!r}")
    return int(text)


def answer(resp: image_pb2.ClassifyResponse) -> dict[str, Any]:
    return {
        "model": resp.model,
        "version": resp.version,
        "results": [
            {
                "image_id": r.image_id,
                "labels": [{"label": lb.label, "index": lb.index, "score": lb.score} for lb in r.labels],
            }
            for r in resp.results
        ],
    }
