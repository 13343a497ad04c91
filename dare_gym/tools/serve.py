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

**Batching** (:class:`Batcher`). Requests go to one worker thread that owns the model. When idle, it collects
requests for up to ``batch_wait_ms`` after the first (or until ``max_batch_size`` rows wait); then each sampler
call takes at most ``max_batch_size`` rows, dealt in turn from the requests that share the settings (sampler name
and every option value) of the request at the head of the line, which then goes to the back. A big request runs
in chunks, and one that arrives meanwhile waits one call per request ahead of it, not for the big one to end. A
seeded request shares no call and keeps its own generator across its chunks. Greedy LLaDA rows compute what they
compute alone, so batching changes speed, not text.

**Bounds.** One request cannot stop the server or starve the others: every field is checked before any work,
against bounds derived from the model: prompt + ``gen_length`` within the context (``max_model_len``, default the
config's ``max_position_embeddings``), ``steps <= gen_length``, ``steps_per_block`` within the model's block,
``top_k`` within the vocabulary, ``seed`` in ``[0, 2**63)``, finite numbers, ``n <= max_n``, at most
``max_prompts`` prompts and 32 stop strings; a prompt longer in characters than the context times the longest
token of the vocabulary is refused before it is tokenized (tokenizing and chat templates run off the event
loop); a body is read whole up to ``max_body_bytes`` (413 past it) and must be UTF-8 JSON without ``NaN`` or
``Infinity``. If the worker thread dies anyway (a bug, a plugin sampler that raises ``SystemExit``), every
waiting request gets a 503, ``/health`` answers 503 and the server shuts down (``dare-gym serve`` exits with 1).

**Errors** are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), unknown routes included: 400
for bad fields (the field and value named), unknown fields, streaming, and prompts plus ``max_tokens`` beyond the
model's context; 404 for an unknown model; 401 for a missing or wrong key when the server has ``--api-key``; 413
for a body over the limit; 503 once the worker has died.
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
DEFAULT_MAX_PROMPTS = 64
MAX_STOPS = 32  # OpenAI allows 4; clients such as OpenCompass may send more, each a cheap scan
MAX_SEED = 2**63  # a seed is a non-negative 64-bit signed integer, what torch.Generator.manual_seed takes
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
    _check_bounds(policy, options)
    keep = options.gen_length if max_tokens is None else min(max_tokens, options.gen_length)
    return Plan(name, options, keep, seed)


def _check_bounds(policy, options) -> None:
    """Bounds the samplers do not need but a server does, derived from the model: each step commits at least
    one token (so ``steps <= gen_length``: a step costs memory and time whether or not it commits), a block
    has at most its size in steps, ``top_k`` at most the vocabulary, and every number is finite."""
    values = dataclasses.asdict(options)
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{key}={value} must be a finite number", param=key)
    if "steps" in values and values["steps"] > options.gen_length:
        raise RequestError(f"steps={values['steps']} is more than gen_length={options.gen_length}: every step "
                           "commits at least one token", param="steps")
    block = getattr(policy, "block_size", None)
    if "steps_per_block" in values and block and values["steps_per_block"] > block:
        raise RequestError(f"steps_per_block={values['steps_per_block']} is more than the model's block size "
                           f"of {block} tokens", param="steps_per_block")
    vocabulary = len(policy.tokenizer)
    if values.get("top_k", 0) > vocabulary:
        raise RequestError(f"top_k={values['top_k']} is more than the vocabulary of {vocabulary} tokens",
                           param="top_k")


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


class WorkerDied(RuntimeError):
    """The batching worker stopped on an error: the server can no longer answer, so it fails health and exits."""


@dataclass
class _Job:
    """One request in the worker: its rows (rendered prompts, each repeated n times in a row), how many have
    been generated, and their choices so far."""

    prompts: list[str]
    plan: Plan
    stops: list[str]
    future: concurrent.futures.Future
    key: tuple = field(default=())
    done: int = 0  # rows generated so far (rows are generated in order)
    choices: list = field(default_factory=list)
    generator: torch.Generator | None = None  # a seeded request's own, kept across its chunks

    @property
    def rows_left(self) -> int:
        return len(self.prompts) - self.done


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

    Scheduling is fair: each sampler call takes at most ``max_batch_size`` rows, dealt one at a time in turn
    from the waiting requests that share the settings of the request at the head of the line; then the head
    goes to the back. A big request thus runs in chunks, and a request that arrives meanwhile waits for one
    call per request ahead of it, never for the whole of a big one. When the worker is idle, the first request
    opens a collection window of ``batch_wait_ms`` (cut short once ``max_batch_size`` rows are waiting). ``seed``
    seeds the generator of unseeded sampled requests, so a server's run is reproducible for a given request
    order; a seeded request has a generator of its own, used by its chunks in order, and shares no call.

    If the worker itself fails (a bug: every request's own errors go to that request), every waiting request
    gets the error, :attr:`error` says why, and :meth:`submit` refuses new ones: the server then fails
    ``/health`` and exits.
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
        self.error: BaseException | None = None
        self.on_death = None  # called (from the worker thread) once the worker has died
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._active: list[_Job] = []
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_worker, name="dare-gym-serve-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def submit(self, prompts: Sequence[str], plan: Plan, n: int = 1, stops: Sequence[str] = ()) -> concurrent.futures.Future:
        """Queue ``n`` completions of each prompt; the future resolves to a list of :class:`Choice` (prompt-major:
        the ``n`` choices of prompt 0 first)."""
        if self.error is not None:
            raise WorkerDied(f"the batching worker died: {type(self.error).__name__}: {self.error}")
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the batcher is not running: call start() first")
        job = _Job([p for p in prompts for _ in range(n)], plan, list(stops), concurrent.futures.Future())
        job.key = plan.key()
        self.stats.requests += 1
        self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------------------------ the worker
    def _run_worker(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # noqa: BLE001 - reported to every request, to /health and to serve()
            self.error = error
            for job in self._active + list(_drain(self._queue)):
                if not job.future.done():
                    job.future.set_exception(WorkerDied(f"the batching worker died: {type(error).__name__}: {error}"))
            self._active.clear()
            if self.on_death is not None:
                self.on_death(error)
            return
        for job in self._active + list(_drain(self._queue)):  # requests still waiting at shutdown
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._active.clear()

    def _loop(self) -> None:
        while True:
            if not self._active:  # idle: wait for a request, then collect for the window
                first = self._queue.get()
                if first is None:
                    return
                self._admit(first)
                deadline = time.monotonic() + self.wait_s
                while sum(job.rows_left for job in self._active) < self.max_batch_size:
                    try:
                        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    self._admit(job)
            else:  # busy: take whatever arrived during the last call, without waiting
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    self._admit(job)
            if self._active:
                self._round()

    def _admit(self, job: _Job) -> None:
        """Take a request in, unless its client gave up while it was queued."""
        if job.future.set_running_or_notify_cancel():
            self._active.append(job)

    def _round(self) -> None:
        """One sampler call: rows dealt in turn from the requests sharing the head request's settings."""
        head = self._active[0]
        sharing = [job for job in self._active if job.key == head.key]
        taken = {id(job): 0 for job in sharing}
        rows = 0
        while rows < self.max_batch_size:
            progressed = False
            for job in sharing:
                if rows < self.max_batch_size and taken[id(job)] < job.rows_left:
                    taken[id(job)] += 1
                    rows += 1
                    progressed = True
            if not progressed:
                break
        chunks = [(job, job.prompts[job.done:job.done + taken[id(job)]]) for job in sharing if taken[id(job)]]
        self._generate(head.plan, chunks)
        finished = {id(job) for job, _ in chunks if job.future.done()}
        rest = [job for job in self._active[1:] if id(job) not in finished]
        self._active = rest + ([head] if id(head) not in finished else [])

    def _generate(self, plan: Plan, chunks: list[tuple[_Job, list[str]]]) -> None:
        prompts = [prompt for _, rows in chunks for prompt in rows]
        try:
            if plan.seed is not None:  # alone in its calls (its key is its own): its generator goes on
                job = chunks[0][0]
                if job.generator is None:
                    job.generator = torch.Generator(device=self.policy.device).manual_seed(plan.seed)
                generator = job.generator
            else:
                generator = self.generator
            completions = self.policy.generate(prompts, sampler=plan.sampler, generator=generator,
                                               batch_size=self.max_batch_size, **dataclasses.asdict(plan.options))
            self.stats.calls.append(len(prompts))
            start = 0
            for job, rows in chunks:
                mine = completions[start:start + len(rows)]
                start += len(rows)
                job.choices += [self._choice(c, job.plan.max_tokens, job.stops) for c in mine]
                job.done += len(rows)
                if job.rows_left == 0:
                    job.future.set_result(job.choices)
        except Exception as error:  # noqa: BLE001 - reported to every request of the call
            for job, _ in chunks:
                if not job.future.done():
                    job.future.set_exception(error)

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
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
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




def longest_token_chars(tokenizer) -> int:
    """The most characters one token of the vocabulary decodes to (at most its vocabulary string's length:
    byte-level and SentencePiece markers stand for one character each). A text with more than ``n`` times this
    many characters has more than ``n`` tokens, which a server can tell before tokenizing it."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def _error_body(message: str, *, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class _BodyGuard:
    """ASGI middleware in front of the app: a request body is read whole, at most ``max_bytes`` (413 past
    that, before any parsing), and must be UTF-8 JSON without ``NaN``/``Infinity`` (400 otherwise); the app then
    gets the same bytes. Errors are OpenAI-shaped, as every other error of this server."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, f"the request body is over this server's limit of "
                                                           f"{self.max_bytes} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, f"the request body is over this server's limit of "
                                                               f"{self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _body_problem(body)
        if problem is not None:
            await self._refuse(scope, receive, send, 400, problem)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse(_error_body(message, param="body"), status_code=status)(scope, receive, send)


def _body_problem(body: bytes) -> str | None:
    """Why a request body is not UTF-8 JSON a client meant (None if it is)."""
    import json

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the request body is not UTF-8 (byte {body[error.start]:#04x} at offset {error.start})"

    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        return "the request body is not valid JSON: nested too deeply"
    except ValueError as error:
        return f"the request body is not valid JSON: {error}"
    return None


def create_app(policy, *, model_name: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
               batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, max_model_len: int | None = None,
               max_n: int = DEFAULT_MAX_N, max_prompts: int = DEFAULT_MAX_PROMPTS, max_body_bytes: int | None = None,
               api_key: str | None = None, seed: int = 0):
    """The FastAPI app serving ``policy`` as ``model_name``. Every field is bounded before any work: ``max_model_len``
    (default: the model config's ``max_position_embeddings``) bounds prompt + generated tokens, and through the
    longest token of the vocabulary the characters of a prompt (checked before tokenizing, which runs off the
    event loop); ``max_n`` bounds ``n``, ``max_prompts`` the prompts of a request, ``max_body_bytes`` (default:
    what ``max_prompts`` prompts of the longest length take, at least 1 MiB) the body. The batcher starts and
    stops with the app (its lifespan); it is ``app.state.batcher``. If it dies, ``/health`` fails and
    ``app.state.shutdown()`` (set by whoever runs the app) is called."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    if max_model_len is None:
        max_model_len = getattr(getattr(policy.model, "config", None), "max_position_embeddings", None)
    if not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError("the model's config has no max_position_embeddings: pass max_model_len (--max-model-len)")
    max_prompt_chars = max_model_len * longest_token_chars(policy.tokenizer)
    if max_body_bytes is None:
        max_body_bytes = max(1 << 20, 4 * max_prompts * max_prompt_chars + (1 << 16))  # UTF-8: <= 4 bytes a char
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
    app.state.shutdown = None

    def worker_died(error: BaseException) -> None:
        if app.state.shutdown is not None:
            app.state.shutdown()

    batcher.on_death = worker_died
    created = int(time.time())

    def error_response(status: int, message: str, *, param: str | None = None,
                       kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status, content=_error_body(message, param=param, kind=kind))

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

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind=kind)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                      kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if batcher.error is not None:
            return JSONResponse(status_code=503, content={
                "status": "error", "error": f"the batching worker died: {type(batcher.error).__name__}: "
                                            f"{batcher.error}"})
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return batcher.stats.as_dict()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dare_gym", "max_model_len": max_model_len}]}

    def check_request(body: _Common, prompts: list[str]) -> list[str]:
        """Every bound that needs no tokenizer; returns the stop strings."""
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
        if len(prompts) > max_prompts:
            raise RequestError(f"{len(prompts)} prompts is over this server's limit of {max_prompts} a request",
                               param="prompt")
        for index, prompt in enumerate(prompts):
            if len(prompt) > max_prompt_chars:
                raise RequestError(f"prompt {index} has {len(prompt)} characters: more tokens than the model's "
                                   f"context of {max_model_len} tokens", param="prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS:
            raise RequestError(f"{len(stops)} stop strings is over the limit of {MAX_STOPS}", param="stop")
        return stops

    async def run(body: _Common, prompts: list[str], max_tokens: int | None) -> list[Choice]:
        stops = check_request(body, prompts)
        # tokenizing takes time linear in the (bounded) text: off the event loop, which keeps serving meanwhile
        longest = await asyncio.to_thread(lambda: max(count_tokens(policy, p) for p in prompts))
        plan = plan_generation(policy, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                               seed=body.seed, extra=dict(body.model_extra or {}), max_model_len=max_model_len,
                               prompt_tokens=longest)
        try:
            return await asyncio.wrap_future(batcher.submit(prompts, plan, body.n, stops))
        except WorkerDied as error:
            raise RequestError(str(error), status=503, kind="server_error") from None
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
        messages = [m.as_dict() for m in body.messages]
        if sum(len(m["content"]) for m in messages) > max_prompt_chars:
            raise RequestError(f"the messages have more characters than the model's context of {max_model_len} "
                               "tokens can hold", param="messages")
        prompt = await asyncio.to_thread(render_chat, policy, messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        choices = await run(body, [prompt], limit)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "usage": usage(choices, body.n),
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(choices)]}

    app.add_middleware(_BodyGuard, max_bytes=max_body_bytes)
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
        _stop_when_asked(app, self._server)
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


def _stop_when_asked(app, server) -> None:
    """Let the app stop ``server`` (its batcher died: a server that cannot answer should not look alive)."""
    state = getattr(app, "state", None)
    if state is not None and hasattr(state, "shutdown"):
        state.shutdown = lambda: setattr(server, "should_exit", True)


def serve(policy, *, model_name: str, host: str = DEFAULT_HOST, port: int = 8000, announce=print,
          **app_options) -> None:
    """Serve ``policy`` in the foreground until interrupted (returns) or until its batching worker dies (raises
    :class:`WorkerDied` once the server has shut down); ``announce`` gets the line with the base URL once the
    socket is bound (``port=0`` picks a free port)."""
    import uvicorn

    app = create_app(policy, model_name=model_name, **app_options)
    sock = bind_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {model_name!r} at http://{shown}:{sock.getsockname()[1]}/v1 "
             "(/v1/models, /v1/completions, /v1/chat/completions; Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    _stop_when_asked(app, server)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    finally:
        sock.close()
    error = app.state.batcher.error
    if error is not None:
        raise WorkerDied(f"the batching worker died: {type(error).__name__}: {error}") from error


__all__ = ["AppThread", "Batcher", "BatchStats", "Choice", "Plan", "RequestError", "ServerThread", "WorkerDied",
           "create_app", "fit_schedule", "longest_token_chars", "plan_generation", "render_chat", "render_plain",
           "serve"]
