"""An OpenAI-compatible API over the same engine: POST /v1/chat/completions (plain and SSE
streaming, text and image_url parts), GET /v1/models. Errors are OpenAI-style JSON with 4xx codes."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from assistant.inputs.chat_format import ConversationError
from assistant.inference.engine import ChatSession, Engine
from assistant.inference.generation import GenerationConfig
from assistant.inputs.images import ImageError, load_image


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(status_code=e.status,
                        content={"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})


def decode_image(url: str, where: str, max_bytes: int, allow_remote: bool):
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{where}: only base64 data: URLs are supported", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data: URL is not valid base64", where) from None
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise APIError(400, f"{where}: remote image URLs are not fetched by this server (start it with "
                                "--allow-remote-images, or send the image as a base64 data: URL)", where)
        data = _fetch(url, max_bytes, where)
    else:
        raise APIError(400, f"{where}: image_url must be a data: URL" + (" or http(s) URL" if allow_remote else ""),
                       where)
    if len(data) > max_bytes:
        raise APIError(413, f"{where}: image is {len(data) / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit",
                       where)
    try:
        return load_image(data, max_bytes=max_bytes)
    except ImageError as e:
        raise APIError(400, f"{where}: {e}", where) from None


def _fetch(url: str, max_bytes: int, where: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read(max_bytes + 1)
    except OSError as e:
        raise APIError(400, f"{where}: could not fetch the image ({e})", where) from None


def parse_messages(raw, max_bytes: int, allow_remote: bool):
    """OpenAI messages -> (our messages, images, system prompt)."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    messages, images, system = [], [], None
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where}: role must be system, user or assistant", where)
        content = m.get("content")
        parts = []
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}] if content else []
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref  # object form and plain-string form
                    if not isinstance(url, str):
                        raise APIError(400, f"{pw}: image_url needs a url", pw)
                    images.append(decode_image(url, pw, max_bytes, allow_remote))
                    parts.append({"type": "image"})
                else:
                    raise APIError(400, f"{pw}: part type must be 'text' or 'image_url'", pw)
        elif content is not None:
            raise APIError(400, f"{where}: content must be a string or a list of parts", where)
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "system":
            system = "\n".join(p["text"] for p in parts if p["type"] == "text")
            continue
        if role == "assistant" and any(p["type"] == "image" for p in parts):
            raise APIError(400, f"{where}: images can only be sent in user messages", where)
        messages.append({"role": role, "content": parts})
    if not messages or messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", "messages")
    if not messages[-1]["content"]:
        raise APIError(400, "the last user message is empty", "messages")
    return messages, images, system


def generation_config(body: dict) -> GenerationConfig:
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    try:
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
        cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=float(body.get("temperature", 0.0) or 0.0),
                               top_p=float(body.get("top_p", 1.0) or 1.0), stop=stop,
                               seed=body.get("seed") if isinstance(body.get("seed"), int) else None)
        return cfg.validate()
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e)) from None


def build_router(engine: Engine, model_name: str, *, max_image_mb: float = 10, allow_remote_images: bool = False,
                 concurrency: int = 1, api_key: str | None = None) -> APIRouter:
    router = APIRouter()
    slots = threading.Semaphore(concurrency)
    max_bytes = int(max_image_mb * 1024 * 1024)

    def authorise(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")

    @router.get("/v1/models")
    def models(request: Request):
        try:
            authorise(request)
        except APIError as e:
            return error_response(e)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            authorise(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            if body.get("model") not in (None, model_name, "default"):
                raise APIError(404, f"model {body.get('model')!r} is not served here; GET /v1/models lists it",
                               "model", kind="not_found_error")
            messages, images, system = parse_messages(body.get("messages"), max_bytes, allow_remote_images)
            config = generation_config(body)
            session = ChatSession(system_prompt=system)
            session.sync(messages, images, [f"api-{i}" for i in range(len(images))])
            engine.processor.encode(session.full_messages(), session.images)  # placeholder / image count check
            explain = body.get("explain", False)  # this server's extension: where the model looked
            if not isinstance(explain, bool):
                raise APIError(400, "'explain' must be true or false", "explain")
            if explain and not images:
                raise APIError(400, "'explain' needs an image in the messages", "explain")
            question = session.full_messages()
        except APIError as e:
            return error_response(e)
        except (ConversationError, ImageError, ValueError) as e:
            return error_response(APIError(400, str(e)))
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(stream(session, config, completion_id, created, question if explain else None),
                                     media_type="text/event-stream")
        import anyio

        try:
            text = await anyio.to_thread.run_sync(lambda: run(session, config))
            response = {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": session.finish_reason}], "usage": session.usage}
            if explain:
                response["explanation"] = await anyio.to_thread.run_sync(
                    lambda: explanation(question, session.images, text))
        except (ConversationError, ValueError) as e:
            return error_response(APIError(400, str(e)))
        return response

    def explanation(question, images, answer) -> dict:
        """The map as numbers and as PNG data URLs, one per image, with the image-reliance figures."""
        from assistant.explain import heatmap, png_data_url

        with slots:
            e = engine.explain(question, images, answer)
        return {**e.to_dict(), "heatmaps": [png_data_url(heatmap(im, m)) for im, m in zip(images, e.maps)]}

    def run(session, config) -> str:
        with slots:
            return "".join(engine.stream_chat(session, config)).strip()

    def stream(session, config, completion_id, created, question=None):
        def chunk(delta, finish=None) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        pieces = []
        with slots:  # released when the client goes away too: Starlette closes this generator
            yield event(chunk({"role": "assistant", "content": ""}))
            try:
                for piece in engine.stream_chat(session, config):
                    pieces.append(piece)
                    yield event(chunk({"content": piece}))
            except (ConversationError, ValueError) as e:
                yield event({"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            final = chunk({}, session.finish_reason)
        if question is not None:  # the explanation rides on the last chunk
            try:
                final["explanation"] = explanation(question, session.images, "".join(pieces).strip())
            except (ConversationError, ValueError) as e:
                final["explanation"] = {"error": str(e)}
        yield event(final)
        yield "data: [DONE]\n\n"

    return router
