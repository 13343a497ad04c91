"""A reward from a judge model: any OpenAI-compatible endpoint (``vllm serve``, SGLang, ``dare-gym serve``) scores
a completion against a rubric.

    from dare_gym.rewards.judge import JudgeReward
    judge = JudgeReward("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct", rubric="Is the proof complete?")
    env = dare_gym.make("math500-v0", reward=[("math_verify", 1.0), (judge, 0.5)])

**The request.** ``template`` is filled with ``{rubric}``, ``{prompt}`` (the record's ``prompt``, ``question``,
``problem``, ``text`` or ``input`` field, the first present), ``{reference}`` (its ``answer``, ``solution``,
``output`` or ``reference``; empty if none), ``{completion}`` and any other field of the record by name. It goes
as one user message to ``/v1/chat/completions`` (``api="chat"``, the default: the judge's chat template applies)
or as a raw prompt to ``/v1/completions`` (``api="completions"``), greedy (``temperature=0``) with
``max_tokens`` (16) tokens, plus ``extra_body`` (e.g. sampler settings for a ``dare-gym serve`` judge).

**The score** (:func:`parse_score`): the last ``SCORE: <number>`` in the reply (case-insensitive, ``:`` or
``=``), else a reply that is nothing but a number; it must lie in ``score_range`` (default 0-10) and is mapped
linearly onto [0, 1]. A reply with no score, or one out of range, is an error naming the reply: the term scores 0
and the reason lands in ``info["reward_errors"]``, as for any failing reward.

**Batching.** A batch (``batch_fn``) goes out at once: ``api="chat"`` as up to ``concurrency`` requests in flight
(servers batch concurrent requests: vLLM's continuous batching, ``dare-gym serve``'s queue), ``api="completions"``
as one request per ``batch_size`` prompts (OpenAI's list-of-prompts form).

**Time limits and retries.** Each HTTP request has ``timeout_s`` (15 s); a refused connection, a timeout, HTTP 429
or 5xx is retried ``retries`` times (2) after ``backoff_s`` x 2^attempt; other 4xx answers are not retried. The
worst case for one request is about ``(retries + 1) * timeout_s + backoff`` (under a minute with the defaults,
inside an env's default ``reward_timeout_s`` of 60 s, which still bounds the whole call). An endpoint that cannot
be reached fails with :class:`JudgeUnavailable`, whose message names the URL and what went wrong.

The judge uses the standard library only (``urllib``), so it works in the helper processes rewards run in.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

DEFAULT_RUBRIC = "The response solves the task correctly, with sound reasoning and a clearly stated final answer."
DEFAULT_TEMPLATE = """You are a strict grader. Grade the response to the task against the rubric.

Rubric: {rubric}

Task:
{prompt}

Reference answer (may be empty):
{reference}

Response:
{completion}

Give a score from 0 (fails the rubric) to 10 (fully meets it). Reply with one line, "SCORE: <number>", and nothing else."""
PROMPT_FIELDS = ("prompt", "question", "problem", "text", "input")
REFERENCE_FIELDS = ("answer", "solution", "output", "reference")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*\.?\s*")


class JudgeError(RuntimeError):
    """The judge answered, but not with a usable score (or refused the request)."""


class JudgeUnavailable(JudgeError):
    """The endpoint could not be reached or kept failing after the retries."""


def parse_score(reply: str, score_range: tuple[float, float] = (0.0, 10.0)) -> float:
    """The judge's score mapped onto [0, 1] (see the module docstring).

    >>> parse_score("The answer is right.\\nSCORE: 8")
    0.8
    >>> parse_score(" 5 "), parse_score("score = 10/10")
    (0.5, 1.0)
    """
    low, high = score_range
    found = _SCORE.findall(reply)
    if found:
        value = float(found[-1])
    elif _NUMBER.fullmatch(reply):
        value = float(_NUMBER.fullmatch(reply).group(1))
    else:
        raise JudgeError(f"no score in the judge's reply {reply[:40]!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise JudgeError(f"judge's score {value:g} outside [{low:g}, {high:g}]")
    return (value - low) / (high - low)


def first_field(sample: Mapping, names: Sequence[str]) -> str:
    for name in names:
        if sample.get(name) is not None:
            return str(sample[name])
    return ""


class JudgeReward:
    """A per-sample reward ``judge(completion, sample) -> float`` in [0, 1] with a ``batch_fn`` (module docstring).

    ``base_url``: the endpoint's ``.../v1``; ``model``: the judge's model id; ``api_key``: sent as a bearer token
    (default: the ``DARE_GYM_JUDGE_API_KEY`` environment variable, else none). ``name`` is the term's name in
    ``reward_components``.
    """

    value_range = (0.0, 1.0)
    linear_time = False

    def __init__(self, base_url: str, model: str, *, rubric: str = DEFAULT_RUBRIC, template: str = DEFAULT_TEMPLATE,
                 api: str = "chat", api_key: str | None = None, max_tokens: int = 16, temperature: float = 0.0,
                 score_range: tuple[float, float] = (0.0, 10.0), timeout_s: float = 15.0, retries: int = 2,
                 backoff_s: float = 0.5, concurrency: int = 16, batch_size: int = 64, extra_body: dict | None = None,
                 name: str = "judge"):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        if not timeout_s > 0 or retries < 0 or backoff_s < 0 or concurrency < 1 or batch_size < 1:
            raise ValueError(f"need timeout_s > 0, retries >= 0, backoff_s >= 0, concurrency >= 1, batch_size >= 1; "
                             f"got {timeout_s}, {retries}, {backoff_s}, {concurrency}, {batch_size}")
        if not score_range[0] < score_range[1]:
            raise ValueError(f"score_range must be (low, high) with low < high, got {score_range!r}")
        for key in ("{completion}",):
            if key not in template:
                raise ValueError(f"the judge template must contain {key}")
        self.base_url = base_url.rstrip("/")
        self.model, self.rubric, self.template, self.api = model, rubric, template, api
        self.api_key = api_key if api_key is not None else os.environ.get("DARE_GYM_JUDGE_API_KEY")
        self.max_tokens, self.temperature, self.score_range = max_tokens, temperature, tuple(score_range)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency, self.batch_size, self.extra_body = concurrency, batch_size, dict(extra_body or {})
        self.reward_name = name

    def __repr__(self) -> str:
        return f"JudgeReward({self.base_url!r}, {self.model!r}, api={self.api!r})"

    # ------------------------------------------------------------------------------------ the request
    def judge_prompt(self, completion: str, sample: Mapping) -> str:
        """The text the judge reads for one completion."""
        fields = {str(k): v for k, v in sample.items()}
        fields.update(rubric=self.rubric, completion=completion, prompt=first_field(sample, PROMPT_FIELDS),
                      reference=first_field(sample, REFERENCE_FIELDS))
        try:
            return self.template.format_map(fields)
        except KeyError as error:
            raise JudgeError(f"the judge template names {{{error.args[0]}}}, which the record does not have "
                             f"(its fields: {', '.join(map(str, sample))})") from None

    def request_body(self, prompts: Sequence[str]) -> dict:
        """The JSON body for ``prompts`` (one for chat; a list for the completions API)."""
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature, "n": 1}
        if self.api == "chat":
            if len(prompts) != 1:
                raise ValueError("a chat request carries one prompt")
            body["messages"] = [{"role": "user", "content": prompts[0]}]
        else:
            body["prompt"] = list(prompts)
        body.update(self.extra_body)
        return body

    def post(self, body: dict) -> dict:
        """POST ``body`` to the endpoint with the time limit and retries; the decoded JSON answer."""
        url = f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code not in RETRY_STATUS:
                    raise JudgeError(f"the judge at {url} refused the request: HTTP {error.code}: {message}") from None
                problem = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                problem = (f"no answer within {self.timeout_s:g} s" if isinstance(reason, (socket.timeout, TimeoutError))
                           else f"{type(reason).__name__}: {reason}")
            except json.JSONDecodeError:
                raise JudgeError(f"the judge at {url} answered with something that is not JSON") from None
        raise JudgeUnavailable(f"the judge endpoint {url} is unavailable: {problem} "
                               f"({self.retries + 1} attempt{'s' if self.retries else ''})")

    def replies(self, answer: dict, count: int) -> list[str]:
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != count:
            raise JudgeError(f"the judge answered {len(choices)} choices for {count} prompts")
        if self.api == "chat":
            return [str((c.get("message") or {}).get("content") or "") for c in choices]
        return [str(c.get("text") or "") for c in choices]

    # ---------------------------------------------------------------------------------------- scoring
    def __call__(self, completion: str, sample: Mapping) -> float:
        prompt = self.judge_prompt(completion, sample)
        return parse_score(self.replies(self.post(self.request_body([prompt])), 1)[0], self.score_range)

    def batch_fn(self, completions: Sequence[str], samples: Sequence[Mapping]) -> list[float | JudgeError]:
        """Score a batch at once (see the module docstring). An unreachable endpoint or a refused request fails the
        whole call (every completion gets the error); a reply without a usable score fails only its completion: its
        entry is the :class:`JudgeError`, which the reward layer reports as that completion's error (not a
        number) and scores 0."""
        prompts = [self.judge_prompt(c, s) for c, s in zip(completions, samples)]
        if self.api == "chat":
            with ThreadPoolExecutor(min(self.concurrency, max(1, len(prompts)))) as pool:
                replies = list(pool.map(lambda p: self.replies(self.post(self.request_body([p])), 1)[0], prompts))
        else:
            replies = []
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start:start + self.batch_size]
                replies += self.replies(self.post(self.request_body(chunk)), len(chunk))
        return [_score_or_error(reply, self.score_range) for reply in replies]


def _score_or_error(reply: str, score_range: tuple[float, float]) -> float | JudgeError:
    try:
        return parse_score(reply, score_range)
    except JudgeError as error:
        return error


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(error.read().decode())
        detail = payload.get("error", payload)
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)[:300]
    except Exception:  # noqa: BLE001 - any unreadable body: the status line says enough
        return error.reason or ""


__all__ = ["DEFAULT_RUBRIC", "DEFAULT_TEMPLATE", "JudgeError", "JudgeReward", "JudgeUnavailable", "parse_score"]
