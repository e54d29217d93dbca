"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, embeddings, models.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent events),
``POST /v1/embeddings`` (encoder pipelines), and, without a key, ``GET /health`` and
``GET /metrics`` (Prometheus). Every ``/v1`` route needs ``Authorization: Bearer <key>`` when the
server lists keys. Requests are validated (pydantic) and checked against the pipeline (model
kind, context length) before they take a session; SDK calls run in worker threads, one request
per session at a time.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from splitnet.cloud.api.auth import APIKeys
from splitnet.cloud.api.config import APIConfig
from splitnet.cloud.api.errors import APIError, from_splitnet, invalid, unauthorized
from splitnet.cloud.api.generation import Completion, GenerationRequest, run_generation
from splitnet.cloud.api.metrics import APIMetrics
from splitnet.cloud.api.pipeline import PipelineFacts
from splitnet.cloud.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, _Sampling
from splitnet.cloud.api.sdk_adapter import accepts, embeddings
from splitnet.cloud.api.sessions import PoolBusy, SessionPool
from splitnet.errors import SplitnetError

_ROUTES = {"/v1/models", "/v1/models/{model_id}", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics"}


def create_app(facts: PipelineFacts, pool: SessionPool, config: APIConfig, keys: APIKeys,
               stage_probe: Callable[[], list[Any]] | None = None) -> FastAPI:
    """The ASGI app serving ``facts``' pipeline through ``pool``'s sessions. ``stage_probe()``
    (e.g. :func:`splitnet.cloud.cli_status.probe` over the pipeline's endpoints) answers
    ``GET /health?stages=true``."""
    app = FastAPI(title="splitnet OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = APIMetrics()
    metrics.sessions_total.set(pool.size)
    started = int(time.time())
    app.state.metrics, app.state.pool, app.state.facts = metrics, pool, facts

    # ------------------------------------------------------------------ cross-cutting ------
    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable) -> Response:
        t0 = time.perf_counter()
        route = "other"
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.in_flight.dec()
        matched = request.scope.get("route")
        if matched is not None and getattr(matched, "path", None) in _ROUTES:
            route = matched.path
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        metrics.request_seconds.labels(route=route).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        param = ".".join(loc) or None
        text = f"{param}: {msg}" if param else msg
        if len(errs) > 1:
            text += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return JSONResponse(invalid(text, param).body(), status_code=400)

    def authorize(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            metrics.auth_refusals.inc()
            raise unauthorized()

    def check_model(name: str) -> None:
        if name != facts.served_name:
            raise APIError(404, f"model {name!r} does not exist here; this server serves {facts.served_name!r} (GET /v1/models)",
                           "invalid_request_error", "model_not_found", "model")

    def model_card() -> dict:
        return {"id": facts.served_name, "object": "model", "created": started, "owned_by": "splitnet",
                "splitnet": {"kind": facts.kind, "stages": facts.num_stages, "max_positions": facts.max_positions, "fingerprint": facts.fingerprint}}

    # ------------------------------------------------------------------ health, metrics ----
    @app.get("/health")
    async def health(stages: bool = False) -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "model": facts.served_name, "kind": facts.kind, "stages": facts.num_stages,
                                "sessions": pool.size, "sessions_busy": pool.busy}
        if not stages:
            return JSONResponse(body)
        if stage_probe is None:
            raise invalid("this server has no stage probe; ask /health without stages=true", "stages")
        found = await run_in_threadpool(stage_probe)  # each stage asked over its control protocol, no session taken
        body["stage_status"] = [{"endpoint": st.endpoint, "live": st.live, "blocks": st.blocks, "queue_depth": st.queue_depth,
                                 "rtt_ms": st.rtt_ms, "error": st.error} for st in found]
        if not all(st.live for st in found):
            body["status"] = "degraded"
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if config.metrics_need_key:
            authorize(request)
        metrics.sessions_busy.set(pool.busy)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ models -------------
    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        authorize(request)
        check_model(model_id)
        return model_card()

    def check_token_ids(ids: list[int], param: str) -> None:
        if facts.vocab_size is not None and any(t >= facts.vocab_size for t in ids):
            raise invalid(f"token id {max(ids)} is outside the model's vocabulary of {facts.vocab_size} tokens", param)

    # ------------------------------------------------------------------ generation ---------
    def prepare(body: _Sampling, prompt_ids: list[int], max_tokens: int | None, route: str) -> GenerationRequest:
        """The generation a request asks for, checked against the model before any work."""
        from splitnet.edge.sampling import SamplingConfig

        if facts.kind != "decoder":
            raise invalid(f"model {facts.served_name!r} is an {facts.kind}; it has no {route}: use /v1/embeddings", "model")
        if not prompt_ids:
            raise invalid("the prompt is empty", "prompt")
        limit = facts.max_positions
        if max_tokens is None:
            max_tokens = config.default_max_tokens if limit is None else min(config.default_max_tokens, limit - len(prompt_ids) + 1)
            if max_tokens < 1:
                raise invalid(f"the prompt has {len(prompt_ids)} tokens; the model's context holds {limit}", "messages", "context_length_exceeded")
        if limit is not None and len(prompt_ids) + max_tokens - 1 > limit:
            raise invalid(f"a prompt of {len(prompt_ids)} tokens plus max_tokens={max_tokens} exceeds the model's context of {limit} tokens; "
                          f"shorten the prompt or ask for at most {max(0, limit - len(prompt_ids) + 1)} tokens", "max_tokens", "context_length_exceeded")
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, seed=seed)
        return GenerationRequest(prompt_ids, max_tokens, sampling, tuple(body.stop_sequences), facts.eos_ids, config.step_timeout_s, config.request_timeout_s)

    def generate_blocking(req: GenerationRequest, on_delta: Callable[[str], None] | None, cancelled: threading.Event) -> Completion:
        try:
            with pool.session() as session:
                return run_generation(session, facts.tokenizer, req, on_delta, cancelled)
        except PoolBusy as e:
            raise APIError(503, str(e), "server_error", "pipeline_busy") from None
        except SplitnetError as e:
            raise from_splitnet(e) from e

    def account(route: str, c: Completion, t0: float) -> None:
        metrics.prompt_tokens.labels(route=route).inc(c.prompt_tokens)
        metrics.completion_tokens.labels(route=route).inc(len(c.tokens))
        metrics.generation_seconds.labels(route=route).observe(time.perf_counter() - t0)
        if c.ttft_s is not None:
            metrics.ttft_seconds.labels(route=route).observe(c.ttft_s)
        if c.replays:
            metrics.replays.inc(c.replays)

    def token_ids(body: _Sampling, c: Completion) -> dict:
        return {"prompt_token_ids": c.prompt_ids, "token_ids": c.tokens} if body.return_token_ids else {}

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens), "total_tokens": c.prompt_tokens + len(c.tokens)}

    async def sse(route: str, req: GenerationRequest, first: dict | None, chunk: Callable[[str | None, str | None], dict],
                  final_usage: Callable[[Completion], dict] | None) -> AsyncIterator[bytes]:
        """Server-sent events of one generation: ``first`` (if any), a chunk per text delta, the
        finishing chunk, the usage chunk when asked, then ``[DONE]``; an error mid-way becomes an
        ``{"error": ...}`` event."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        t0 = time.perf_counter()

        def on_delta(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("delta", text))

        async def produce() -> None:
            try:
                done = await run_in_threadpool(generate_blocking, req, on_delta, cancelled)
                account(route, done, t0)  # here, not in the consumer: a stream the client left is counted too
                events.put_nowait(("done", done))
            except APIError as e:
                events.put_nowait(("error", e))
            except Exception as e:  # noqa: BLE001 - reported to the client as an error event
                events.put_nowait(("error", APIError(500, f"{type(e).__name__}: {e}", "server_error")))

        task = asyncio.create_task(produce())
        try:
            if first is not None:
                yield _event(first)
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield _event(chunk(value, None))
                elif kind == "error":
                    yield _event(value.body())
                    break
                else:
                    yield _event(chunk(None, value.finish_reason))
                    if final_usage is not None:
                        yield _event(final_usage(value))
                    break
            yield b"data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client went away (or we are done): the generation stops at its next token
            if not task.done():
                task.add_done_callback(lambda t: t.exception())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        authorize(request)
        check_model(body.model)
        route = "/v1/completions"
        prompt_ids = list(body.prompt) if isinstance(body.prompt, list) else list(facts.tokenizer.encode(body.prompt))
        check_token_ids(prompt_ids, "prompt")
        req = prepare(body, prompt_ids, body.max_tokens, "completions")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": facts.served_name, "system_fingerprint": facts.fingerprint[:16]}
        if body.stream:
            def chunk(text: str | None, finish: str | None) -> dict:
                return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": _finish(finish)}]}

            include_usage = body.stream_options is not None and body.stream_options.include_usage
            final = (lambda c: {**base, "choices": [], "usage": usage(c)}) if include_usage else None
            return StreamingResponse(sse(route, req, None, chunk, final), media_type="text/event-stream", headers=_SSE_HEADERS)
        t0 = time.perf_counter()
        c = await run_in_threadpool(generate_blocking, req, None, threading.Event())
        account(route, c, t0)
        choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": _finish(c.finish_reason), **token_ids(body, c)}
        return {**base, "choices": [choice], "usage": usage(c)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        authorize(request)
        check_model(body.model)
        route = "/v1/chat/completions"
        if facts.kind != "decoder":
            raise invalid(f"model {facts.served_name!r} is an {facts.kind}; it has no chat completions: use /v1/embeddings", "model")
        try:
            prompt = facts.chat_template.render([m.model_dump(exclude_none=True) for m in body.messages])
        except SplitnetError as e:
            raise invalid(str(e), "messages") from e
        prompt_ids = list(facts.tokenizer.encode(prompt))
        req = prepare(body, prompt_ids, body.token_limit, "chat completions")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": facts.served_name, "system_fingerprint": facts.fingerprint[:16]}
        if body.stream:
            cbase = {**base, "object": "chat.completion.chunk"}

            def chunk(text: str | None, finish: str | None) -> dict:
                delta = {"content": text} if text is not None else {}
                return {**cbase, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(finish)}]}

            first = {**cbase, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            final = (lambda c: {**cbase, "choices": [], "usage": usage(c)}) if include_usage else None
            return StreamingResponse(sse(route, req, first, chunk, final), media_type="text/event-stream", headers=_SSE_HEADERS)
        t0 = time.perf_counter()
        c = await run_in_threadpool(generate_blocking, req, None, threading.Event())
        account(route, c, t0)
        message = {"role": "assistant", "content": c.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(c.finish_reason), **token_ids(body, c)}
        return {**base, "choices": [choice], "usage": usage(c)}

    # ------------------------------------------------------------------ embeddings ---------
    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Any:
        authorize(request)
        check_model(body.model)
        route = "/v1/embeddings"
        if facts.kind != "encoder":
            raise invalid(f"model {facts.served_name!r} is a {facts.kind}; /v1/embeddings needs an encoder pipeline (e.g. minilm)", "model")
        if len(body.input) > config.max_embedding_inputs:
            raise invalid(f"{len(body.input)} inputs in one request; at most {config.max_embedding_inputs}", "input")
        from splitnet.model.tokenizer import pad_batch

        max_len = min(config.max_embedding_tokens, facts.max_positions or config.max_embedding_tokens)
        if all(isinstance(x, str) for x in body.input):
            tok = facts.tokenizer
            kwargs = {"numpy": True} if accepts(tok, "numpy") else {}  # numpy arrays: no torch tensors on the wire path
            inputs = dict(tok(list(body.input), max_length=max_len, **kwargs))
            inputs = {k: np.asarray(v) for k, v in inputs.items()}
        elif all(isinstance(x, list) for x in body.input):
            if any(len(x) > max_len for x in body.input):
                raise invalid(f"a token input longer than {max_len} tokens", "input")
            for x in body.input:
                check_token_ids(list(x), "input")
            inputs = pad_batch([list(x) for x in body.input], int(getattr(facts.tokenizer, "pad_id", 0) or 0), numpy=True)
        else:
            raise invalid("input mixes strings and token lists", "input")
        n_tokens = int(np.asarray(inputs["attention_mask"]).sum()) if "attention_mask" in inputs else int(np.asarray(inputs["input_ids"]).size)

        def run() -> np.ndarray:
            try:
                with pool.session() as session:
                    return embeddings(session, inputs, config.step_timeout_s)
            except PoolBusy as e:
                raise APIError(503, str(e), "server_error", "pipeline_busy") from None
            except SplitnetError as e:
                raise from_splitnet(e) from e

        t0 = time.perf_counter()
        vectors = await run_in_threadpool(run)
        metrics.prompt_tokens.labels(route=route).inc(n_tokens)
        metrics.generation_seconds.labels(route=route).observe(time.perf_counter() - t0)
        data = []
        for i, v in enumerate(vectors):
            v = np.ascontiguousarray(v, dtype="<f4")
            emb: Any = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": facts.served_name, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _finish(reason: str | None) -> str | None:
    """OpenAI's finish_reason for ours (a cancelled stream reports "stop": the client left)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def _event(obj: dict) -> bytes:
    import json

    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
