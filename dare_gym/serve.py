"""An OpenAI-compatible HTTP server for a dLLM policy: ``dare-gym serve <policy>``.

Endpoints (FastAPI, served by uvicorn on 127.0.0.1 unless told otherwise):

* ``GET /v1/models`` -- the one model this server serves (its name: ``--served-model-name``, default the policy
  argument);
* ``POST /v1/completions`` -- ``prompt`` (a string or a list of strings) completed as raw text, no template;
* ``POST /v1/chat/completions`` -- ``messages`` rendered with the tokenizer's chat template (the whole
  conversation, ``add_generation_prompt=True``) when the policy formats prompts with one (instruct checkpoints).
  A policy without a template (the tiny model, base checkpoints) uses a plain fallback, :func:`render_plain`: a
  conversation of one user message is that message's text unchanged (exactly what the envs send a base model);
  anything longer is rendered as ``"System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nAssistant:"``;
* ``GET /health`` and ``GET /stats`` (sampler calls and rows so far: how well requests were batched).

**Sampler settings** ride on the request as extra JSON fields (``extra_body`` in the ``openai`` client):
``sampler`` (``llada``, ``fast_dllm``, ``block_diffusion``) and any option of that sampler -- ``steps``,
``block_length``, ``remasking``, ``threshold``, ``cache``, ``steps_per_block``, ... (see
:mod:`dare_gym.samplers`). Unset ones take the server's defaults (``--gen`` at start-up over the policy's own
``generation_defaults``). OpenAI's ``temperature`` is the sampler's temperature (absent: the policy's default,
greedy for the shipped policies, not OpenAI's 1.0); ``top_p`` reaches samplers that have it
(``block_diffusion``); ``seed`` makes a sampled request reproducible (such a request runs in a sampler call of
its own, so its rows never depend on what else was queued); ``stop`` strings cut the text; ``n`` completions per
prompt are rows of the same sampler call.

**``max_tokens`` and the block schedule** (:func:`plan_generation`). A completion never has more than
``max_tokens`` tokens. Samplers with a ``block_length`` (``llada``, ``fast_dllm``) need ``gen_length`` to be a
multiple of it, so ``gen_length`` is ``max_tokens`` rounded up to a whole number of blocks (a default
``block_length`` longer than ``max_tokens`` shrinks to ``max_tokens``: one block; an explicit one is kept), the
completion is cut to ``max_tokens`` tokens afterwards, and ``steps``, unless given, keeps the default's tokens
per step (``steps = gen_length * default_steps / default_gen_length``, rounded up to a multiple of the number of
blocks). ``block_diffusion`` takes ``gen_length = max_tokens`` as it is. An explicit ``gen_length`` field wins
over this rule. Without ``max_tokens`` the default ``gen_length`` applies. ``finish_reason`` is ``"stop"`` when
a stop token or stop string ended the text within the limit, ``"length"`` otherwise.

**Batching** (:class:`Batcher`). Requests go to one worker thread that owns the model. It takes the first
waiting request, collects more for up to ``batch_wait_ms`` or until ``max_batch_size`` rows are waiting, groups
them by sampler settings (sampler name and every option value; a seeded request is a group of its own) and
makes one ``policy.generate`` call per group. Greedy LLaDA rows compute what they compute alone, so batching
changes speed, not text.

**Errors** are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 for bad fields (the
field and value named), unknown fields, streaming, and prompts plus ``max_tokens`` beyond the model's context;
404 for an unknown model; 401 for a missing or wrong key when the server has ``--api-key``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import math
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_N = 64
OPENAI_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                 "stop", "seed", "stream", "user", "echo"}
"""Request fields with their OpenAI meaning; every other field must be ``sampler`` or a sampler option."""


class RequestError(ValueError):
    """A bad request: answered with ``status`` and an OpenAI-shaped error naming ``param``."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


# ------------------------------------------------------------------------------------- planning a call


@dataclass(frozen=True)
class Plan:
    """How to run one request: the sampler, its validated options, and how many tokens to keep."""

    sampler: str
    options: Any  # the sampler's options dataclass
    max_tokens: int  # completion tokens kept (<= options.gen_length)
    seed: int | None = None

    def key(self) -> tuple:
        """Requests with equal keys share a sampler call; a seeded request shares with no one."""
        settings = tuple(sorted(dataclasses.asdict(self.options).items()))
        return (self.sampler, settings, ("seeded", uuid.uuid4().hex) if self.seed is not None else None)


def sampler_fields(sampler: str) -> set[str]:
    """The option names sampler ``sampler`` takes."""
    from dare_gym.samplers import get_sampler

    return {f.name for f in dataclasses.fields(get_sampler(sampler).options_class)}


def fit_schedule(max_tokens: int, defaults: dict, explicit: dict) -> dict:
    """``gen_length`` (and ``block_length``, ``steps`` where not given) for at most ``max_tokens`` tokens on a
    block schedule: whole blocks, and the default's tokens per step (see the module docstring).

    >>> fit_schedule(20, {"gen_length": 8, "steps": 8, "block_length": 8}, {})
    {'block_length': 8, 'gen_length': 24, 'steps': 24}
    >>> fit_schedule(5, {"gen_length": 64, "steps": 32, "block_length": 32}, {})
    {'block_length': 5, 'gen_length': 5, 'steps': 3}
    """
    block = explicit.get("block_length") or min(defaults["block_length"], max_tokens)
    blocks = -(-max_tokens // block)
    gen_length = blocks * block
    out = {"block_length": block, "gen_length": gen_length}
    if "steps" not in explicit:
        per_block = math.ceil(gen_length * defaults["steps"] / defaults["gen_length"] / blocks)
        out["steps"] = max(1, per_block) * blocks
    return out


def plan_generation(policy, *, max_tokens: int | None, temperature: float | None, top_p: float | None,
                    seed: int | None, extra: dict, max_model_len: int | None = None,
                    prompt_tokens: int = 0) -> Plan:
    """Turn a request's fields into a :class:`Plan`; a :class:`RequestError` names what is wrong.

    ``extra`` holds the non-OpenAI fields: ``sampler`` and the sampler's options. ``prompt_tokens`` (the longest
    prompt of the request) and ``max_model_len`` bound prompt + ``gen_length``.
    """
    extra = dict(extra)
    sampler = extra.pop("sampler", None)
    if sampler is not None and not isinstance(sampler, str):
        raise RequestError(f"sampler must be a string, got {sampler!r}", param="sampler")
    defaults = dict(policy.generation_defaults)
    name = sampler or defaults.pop("sampler", None) or policy.default_sampler
    defaults.pop("sampler", None)
    try:
        fields = sampler_fields(name)
    except ValueError as error:
        raise RequestError(str(error), param="sampler") from None
    unknown = sorted(set(extra) - fields)
    if unknown:
        raise RequestError(
            f"unsupported field(s) {', '.join(map(repr, unknown))}: this server takes the OpenAI fields "
            f"{', '.join(sorted(OPENAI_FIELDS))} and the options of sampler {name!r}: {', '.join(sorted(fields))}",
            param=unknown[0])
    explicit = dict(extra)
    if temperature is not None:
        explicit["temperature"] = temperature
    if top_p is not None and top_p != 1.0:
        if "top_p" not in fields:
            raise RequestError(f"top_p={top_p} is not supported by sampler {name!r} (only 1.0); samplers with "
                               "top_p: block_diffusion", param="top_p")
        explicit["top_p"] = top_p
    values = {k: v for k, v in defaults.items() if k in fields}
    if max_tokens is not None and "gen_length" not in explicit:
        if "block_length" in fields:
            values.update(fit_schedule(max_tokens, values, explicit))
        else:
            values["gen_length"] = max_tokens
    values.update(explicit)
    try:
        name, options = policy.sampler_settings(name, values)
    except (ValueError, TypeError) as error:
        raise RequestError(str(error), param=_named_field(str(error), values)) from None
    if max_model_len is not None and prompt_tokens + options.gen_length > max_model_len:
        raise RequestError(
            f"too many tokens: the prompt has {prompt_tokens} tokens and max_tokens={max_tokens} needs "
            f"gen_length={options.gen_length}, {prompt_tokens + options.gen_length} in all, over the model's "
            f"context of {max_model_len} tokens", param="max_tokens")
    keep = options.gen_length if max_tokens is None else min(max_tokens, options.gen_length)
    return Plan(name, options, keep, seed)


def _named_field(message: str, values: dict) -> str | None:
    """The first option name a validation message starts with (they read ``"steps=... must ..."``)."""
    head = message.split("=", 1)[0].split(" ", 1)[0]
    return head if head in values else None


# ------------------------------------------------------------------------------------------ rendering


def render_plain(messages: Sequence[dict]) -> str:
    """The fallback chat format for a policy without a chat template (see the module docstring)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def render_chat(policy, messages: Sequence[dict]) -> str:
    """The prompt text of a conversation: the tokenizer's chat template when the policy formats prompts with one,
    else :func:`render_plain`."""
    if policy.chat_template:
        return policy.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return render_plain(messages)


def count_tokens(policy, text: str) -> int:
    return len(policy.tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------- batching


@dataclass
class Choice:
    """One generated completion as the API reports it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Job:
    prompts: list[str]  # rendered prompts, each repeated n times in a row
    plan: Plan
    stops: list[str]
    future: concurrent.futures.Future
    key: tuple = field(default=())


@dataclass
class BatchStats:
    """What the worker did: one entry per sampler call, the number of rows (completions) it produced."""

    calls: list[int] = field(default_factory=list)
    requests: int = 0

    def as_dict(self) -> dict:
        rows = sum(self.calls)
        return {"requests": self.requests, "sampler_calls": len(self.calls), "rows": rows,
                "mean_rows_per_call": rows / len(self.calls) if self.calls else 0.0, "calls": list(self.calls)}


class Batcher:
    """One worker thread that owns the policy and runs queued requests in batched ``policy.generate`` calls.

    ``max_batch_size`` rows (prompts x n) at most are collected per round (a bigger request still runs whole,
    in chunks of that size); collecting stops after ``batch_wait_ms`` from the first request of the round.
    ``seed`` seeds the generator of unseeded sampled requests, so a server's run is reproducible for a given
    request order.
    """

    def __init__(self, policy, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, seed: int = 0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        # Prompts arrive rendered (chat template applied here, or raw text): a view of the policy that does not
        # format them again. It shares the model and tokenizer.
        self.policy = copy.copy(policy)
        self.policy.chat_template = False
        self.max_batch_size = max_batch_size
        self.wait_s = batch_wait_ms / 1000
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dare-gym-serve-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, prompts: Sequence[str], plan: Plan, n: int = 1, stops: Sequence[str] = ()) -> concurrent.futures.Future:
        """Queue ``n`` completions of each prompt; the future resolves to a list of :class:`Choice` (prompt-major:
        the ``n`` choices of prompt 0 first)."""
        if self._thread is None:
            raise RuntimeError("the batcher is not running: call start() first")
        job = _Job([p for p in prompts for _ in range(n)], plan, list(stops), concurrent.futures.Future())
        job.key = plan.key()
        self.stats.requests += 1
        self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        running = True
        while running:
            first = self._queue.get()
            if first is None:
                break
            jobs, rows = [first], len(first.prompts)
            deadline = time.monotonic() + self.wait_s
            while rows < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    running = False
                    break
                jobs.append(job)
                rows += len(job.prompts)
            for group in _group(jobs):
                self._run(group)
        for job in _drain(self._queue):  # requests still queued at shutdown
            job.future.set_exception(RuntimeError("the server is shutting down"))

    def _run(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        plan = live[0].plan
        prompts = [p for job in live for p in job.prompts]
        generator = (torch.Generator(device=self.policy.device).manual_seed(plan.seed) if plan.seed is not None
                     else self.generator)
        try:
            completions = self.policy.generate(prompts, sampler=plan.sampler, generator=generator,
                                               batch_size=self.max_batch_size, **dataclasses.asdict(plan.options))
        except Exception as error:  # noqa: BLE001 - reported to every request of the call
            for job in live:
                job.future.set_exception(error)
            return
        self.stats.calls.append(len(prompts))
        start = 0
        for job in live:
            mine = completions[start:start + len(job.prompts)]
            start += len(job.prompts)
            job.future.set_result([self._choice(c, job.plan.max_tokens, job.stops) for c in mine])

    def _choice(self, completion, max_tokens: int, stops: Sequence[str]) -> Choice:
        """Cut a completion to ``max_tokens`` tokens and at the first stop token or stop string."""
        ids = completion.completion_ids[:max_tokens]
        kept = int(self.policy.completion_mask(ids).sum())  # tokens up to and including the first stop token
        stopped = kept > 0 and int(ids[kept - 1]) in self.policy.stop_token_ids
        text = self.policy.decode(ids)
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
            kept = min(kept, count_tokens(self.policy, text))
        return Choice(text, "stop" if stopped else "length", len(completion.prompt_ids), kept)


def _group(jobs: list[_Job]) -> list[list[_Job]]:
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    return list(groups.values())


def _drain(q: queue.Queue):
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            yield item


# -------------------------------------------------------------------------------------------- the app


class _Common(BaseModel):
    """Fields both endpoints take; extra fields are sampler settings (checked by :func:`plan_generation`)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    user: str | None = None

class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool | None = False

class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str

class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}

class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)




def create_app(policy, *, model_name: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
               batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, max_model_len: int | None = None,
               max_n: int = DEFAULT_MAX_N, api_key: str | None = None, seed: int = 0):
    """The FastAPI app serving ``policy`` as ``model_name``. ``max_model_len`` (default: the model config's
    ``max_position_embeddings``) bounds prompt + generated tokens; ``max_n`` bounds ``n``. The batcher starts
    and stops with the app (its lifespan); it is ``app.state.batcher``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    if max_model_len is None:
        max_model_len = getattr(getattr(policy.model, "config", None), "max_position_embeddings", None)
    batcher = Batcher(policy, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, seed=seed)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="dare-gym serve", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.model_name = model_name
    app.state.max_model_len = max_model_len
    created = int(time.time())

    def error_response(status: int, message: str, *, param: str | None = None,
                       kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind, "param": param, "code": None}})

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        problem = error.errors()[0]
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
        value = problem.get("input")
        shown = "" if problem.get("type") == "missing" else f", got {value!r}"[:200]
        return error_response(400, f"{where or 'body'}: {problem.get('msg', 'invalid')}{shown}", param=where or None)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, error: RequestError):
        return error_response(error.status, str(error), param=error.param, kind=error.kind)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                      kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return batcher.stats.as_dict()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dare_gym", "max_model_len": max_model_len}]}

    async def run(body: _Common, prompts: list[str], max_tokens: int | None) -> list[Choice]:
        if body.model != model_name:
            raise RequestError(f"unknown model {body.model!r}; this server serves {model_name!r}", param="model",
                               status=404, kind="not_found_error")
        if body.n > max_n:
            raise RequestError(f"n={body.n} is over this server's limit of {max_n}", param="n")
        if body.stream:
            raise RequestError("stream=true is not supported: a diffusion sampler commits tokens out of order",
                               param="stream")
        if isinstance(body, CompletionRequest) and body.echo:
            raise RequestError("echo=true is not supported", param="echo")
        if not prompts or any(not p for p in prompts):
            raise RequestError("every prompt must be a non-empty string", param="prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        longest = max(count_tokens(policy, p) for p in prompts)
        plan = plan_generation(policy, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                               seed=body.seed, extra=dict(body.model_extra or {}), max_model_len=max_model_len,
                               prompt_tokens=longest)
        try:
            return await asyncio.wrap_future(batcher.submit(prompts, plan, body.n, stops))
        except ValueError as error:  # the sampler refused the settings (e.g. block_diffusion on full attention)
            raise RequestError(str(error)) from None

    def usage(choices: list[Choice], n: int) -> dict:
        prompt = sum(c.prompt_tokens for c in choices[::n])
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        choices = await run(body, prompts, body.max_tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "usage": usage(choices, body.n),
                "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                            for i, c in enumerate(choices)]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        prompt = render_chat(policy, [m.as_dict() for m in body.messages])
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        choices = await run(body, [prompt], limit)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "usage": usage(choices, body.n),
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(choices)]}

    return app


# ------------------------------------------------------------------------------------------ running it


def bind_socket(host: str = DEFAULT_HOST, port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, read back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AppThread:
    """Serve an ASGI ``app`` with uvicorn in a background thread on ``host`` at a free port (unless ``port`` is
    given) until :meth:`stop`, or as a context manager; ``base_url`` is ``http://host:port/v1``."""

    def __init__(self, app, *, host: str = DEFAULT_HOST, port: int = 0):
        import uvicorn

        self.app = app
        self._socket = bind_socket(host, port)
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="dare-gym-serve", daemon=True)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self, timeout_s: float = 60.0):
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerThread(AppThread):
    """Serve ``policy`` with uvicorn in a background thread (tests, benchmarks, ``dare-gym opencompass``)::

        with ServerThread(policy, model_name="tiny") as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")

    It listens on ``host`` at a free port unless ``port`` is given; leaving the block shuts it down (the batcher
    too). ``app_options`` go to :func:`create_app`.
    """

    def __init__(self, policy, *, model_name: str, host: str = DEFAULT_HOST, port: int = 0, **app_options):
        super().__init__(create_app(policy, model_name=model_name, **app_options), host=host, port=port)

    @property
    def batcher(self) -> Batcher:
        return self.app.state.batcher


def serve(policy, *, model_name: str, host: str = DEFAULT_HOST, port: int = 8000, announce=print,
          **app_options) -> None:
    """Serve ``policy`` in the foreground until interrupted; ``announce`` gets the line with the base URL once
    the socket is bound (``port=0`` picks a free port)."""
    import uvicorn

    app = create_app(policy, model_name=model_name, **app_options)
    sock = bind_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {model_name!r} at http://{shown}:{sock.getsockname()[1]}/v1 "
             "(/v1/models, /v1/completions, /v1/chat/completions; Ctrl-C stops)")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    finally:
        sock.close()


__all__ = ["AppThread", "Batcher", "BatchStats", "Choice", "Plan", "RequestError", "ServerThread", "create_app", "fit_schedule",
           "plan_generation", "render_chat", "render_plain", "serve"]
