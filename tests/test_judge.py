"""The judge reward: request shape, score parsing, batching, time limits, retries and a down endpoint, against a
scripted FastAPI judge on loopback, and one real round trip through ``dare-gym serve``."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import dare_gym
from dare_gym.rewards import resolve_reward
from dare_gym.rewards.judge import JudgeError, JudgeReward, JudgeUnavailable, parse_score
from dare_gym.tools.serve import AppThread, ServerThread, bind_socket

SAMPLE = {"question": "What is 2 + 3?", "answer": "5"}


@pytest.mark.parametrize("reply,score", [("SCORE: 7", 0.7), ("Looks right.\nscore = 10", 1.0), ("**Score:** 3", 0.3),
                                         ("SCORE: 2\nSCORE: 9", 0.9), ("  4 ", 0.4), ("6.5", 0.65)])
def test_the_last_score_in_a_reply_is_mapped_onto_the_unit_interval(reply, score):
    assert parse_score(reply) == pytest.approx(score)


@pytest.mark.parametrize("reply,message", [("I cannot grade this.", "no score in the judge's reply"),
                                           ("SCORE: 11", "judge's score 11 outside [0, 10]"),
                                           ("", "no score")])
def test_a_reply_without_a_usable_score_is_an_error_naming_it(reply, message):
    with pytest.raises(JudgeError, match=re.escape(message)):
        parse_score(reply)


class ScriptedJudge:
    """A judge whose reply depends on the completion it is shown: ``good`` -> SCORE: 7, ``great`` -> SCORE: 10,
    ``vague`` -> no score, ``slow`` -> answers after 3 s, ``flaky`` -> HTTP 503 twice then SCORE: 5, ``reject`` ->
    HTTP 400. It records every request and the most requests it had in flight at once."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.flaky_failures = 0
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/v1/completions")(self.completions)

    def reply(self, text: str) -> str:
        if "reject" in text:
            raise ValueError("reject")
        for word, answer in (("great", "SCORE: 10"), ("good", "Reasonable.\nSCORE: 7"), ("vague", "Hard to say."),
                             ("flaky", "SCORE: 5"), ("slow", "SCORE: 1")):
            if f"Response:\n{word}" in text:
                return answer
        return "SCORE: 0"

    async def handle(self, request: Request, texts: list[str]):
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.2)  # long enough for concurrent requests to overlap
            if any("Response:\nslow" in t for t in texts):
                await asyncio.sleep(3)
            if any("Response:\nflaky" in t for t in texts) and self.flaky_failures < 2:
                self.flaky_failures += 1
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            try:
                return [self.reply(t) for t in texts]
            except ValueError:
                return JSONResponse({"error": {"message": "prompt rejected by policy"}}, status_code=400)
        finally:
            self.in_flight -= 1

    async def chat(self, request: Request):
        body = await request.json()
        replies = await self.handle(request, [body["messages"][0]["content"]])
        if isinstance(replies, JSONResponse):
            return replies
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": replies[0]}}]}

    async def completions(self, request: Request):
        body = await request.json()
        replies = await self.handle(request, body["prompt"])
        if isinstance(replies, JSONResponse):
            return replies
        return {"choices": [{"index": i, "text": r} for i, r in reversed(list(enumerate(replies)))]}


@pytest.fixture()
def judge_server():
    scripted = ScriptedJudge()
    with AppThread(scripted.app) as running:
        yield scripted, running.base_url


def test_the_request_carries_the_rubric_task_reference_and_completion(judge_server):
    scripted, url = judge_server
    judge = JudgeReward(url, "judge-model", rubric="Check the arithmetic.", api_key="k3y",
                        extra_body={"steps": 4}, max_tokens=12)
    assert judge("good", SAMPLE) == pytest.approx(0.7)
    body = scripted.requests[0]
    assert body["model"] == "judge-model" and body["max_tokens"] == 12 and body["temperature"] == 0.0
    assert body["steps"] == 4 and len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    text = body["messages"][0]["content"]
    assert "Rubric: Check the arithmetic." in text and "What is 2 + 3?" in text and "Reference answer" in text
    assert "\n5\n" in text and text.index("What is 2 + 3?") < text.index("Response:\ngood")
    assert scripted.headers[0]["authorization"] == "Bearer k3y"


def test_a_custom_template_names_record_fields_and_an_unknown_one_is_an_error(judge_server):
    scripted, url = judge_server
    judge = JudgeReward(url, "m", template="Q: {question} | gold {answer}\nResponse:\n{completion}")
    assert judge("great", SAMPLE) == 1.0
    assert scripted.requests[0]["messages"][0]["content"] == "Q: What is 2 + 3? | gold 5\nResponse:\ngreat"
    with pytest.raises(JudgeError, match=r"names \{difficulty\}, which the record does not have"):
        JudgeReward(url, "m", template="{difficulty} {completion}")("x", SAMPLE)


def test_a_batch_goes_out_concurrently_and_a_vague_reply_fails_only_its_completion(judge_server):
    scripted, url = judge_server
    reward = resolve_reward([(JudgeReward(url, "m", concurrency=8), 1.0)])
    completions = ["good", "great", "vague", "good", "bad", "great", "good", "great"]
    results = reward.score_many(completions, [SAMPLE] * 8)
    assert [r.total for r in results] == pytest.approx([0.7, 1.0, 0.0, 0.7, 0.0, 1.0, 0.7, 1.0])
    assert len(scripted.requests) == 8 and scripted.most_in_flight > 1
    assert "no score in the judge's reply 'Hard to say.'" in results[2].errors["judge"]
    assert all(not r.errors for i, r in enumerate(results) if i != 2)


def test_the_completions_api_sends_a_batch_as_lists_of_prompts(judge_server):
    scripted, url = judge_server
    judge = JudgeReward(url, "m", api="completions", batch_size=3)
    scores = judge.batch_fn(["good", "great", "bad", "good", "great"], [SAMPLE] * 5)
    assert scores == pytest.approx([0.7, 1.0, 0.0, 0.7, 1.0])  # choices matched by index, not order
    assert [len(r["prompt"]) for r in scripted.requests] == [3, 2]


def test_a_slow_judge_is_cut_at_the_time_limit_and_retried(judge_server):
    scripted, url = judge_server
    judge = JudgeReward(url, "m", timeout_s=0.5, retries=1, backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(JudgeUnavailable, match=r"unavailable: no answer within 0.5 s \(2 attempts\)"):
        judge("slow", SAMPLE)
    assert time.monotonic() - start < 2 * 0.5 + 0.1 + 1.0  # two limits and a backoff, not the judge's 3 s
    assert len(scripted.requests) == 2


def test_overloaded_answers_are_retried_and_a_refusal_is_not(judge_server):
    scripted, url = judge_server
    assert JudgeReward(url, "m", retries=2, backoff_s=0.05)("flaky", SAMPLE) == 0.5
    assert len(scripted.requests) == 3  # two 503s, then the score
    scripted.flaky_failures = 0
    with pytest.raises(JudgeUnavailable, match="HTTP 503: overloaded"):
        JudgeReward(url, "m", retries=1, backoff_s=0.05)("flaky", SAMPLE)
    count = len(scripted.requests)
    with pytest.raises(JudgeError, match="refused the request: HTTP 400: prompt rejected by policy"):
        JudgeReward(url, "m", retries=3)("reject", SAMPLE)
    assert len(scripted.requests) == count + 1


def test_a_down_endpoint_is_a_reward_error_in_info_not_a_crash():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    judge = JudgeReward(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff_s=0.05)
    env = dare_gym.make("digitsort-v0", split="test", reward=[("exact_match", 1.0), (judge, 0.5)])
    prompt, _ = env.reset(options={"index": 0})
    _, reward, terminated, _, info = env.step("012345")
    assert terminated and info["reward_components"]["judge"] == 0.0
    error = info["reward_errors"]["judge"]
    assert f"127.0.0.1:{port}/v1/chat/completions is unavailable" in error and "(2 attempts)" in error
    assert reward == info["reward_components"]["exact_match"]  # the other term still counts


def test_a_real_round_trip_through_dare_gym_serve(tiny_policy):
    # The tiny policy sorts digits; as a "judge" it reads "sort <completion>" and its sorted digits are the score.
    judge = JudgeReward("", "tiny", template="sort {completion}\n", score_range=(0, 10**6), max_tokens=8)
    completions = ["583920", "9381", "4040"]
    expected = [int(c.text) / 10**6 for c in tiny_policy.generate([f"sort {c}\n" for c in completions])]
    with ServerThread(tiny_policy, model_name="tiny", batch_wait_ms=50) as server:
        judge.base_url = server.base_url
        assert judge.batch_fn(completions, [{}] * 3) == pytest.approx(expected)
        assert judge("583920", {}) == pytest.approx(expected[0])
        assert server.batcher.stats.requests == 4
