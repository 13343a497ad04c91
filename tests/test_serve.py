"""``dare-gym serve``: the real ``openai`` client against a real uvicorn server on a free loopback port."""

from __future__ import annotations

import copy
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dare_gym.tools.serve import ServerThread, fit_schedule, plan_generation, render_plain, RequestError

PROMPT = "sort 583920\n"


@pytest.fixture(scope="module")
def server(tiny_policy):
    with ServerThread(tiny_policy, model_name="tiny", batch_wait_ms=5) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_a_greedy_completion_is_the_policys_own(client, tiny_policy):
    expected = tiny_policy.generate([PROMPT])[0]
    response = client.completions.create(model="tiny", prompt=PROMPT)
    choice = response.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "stop"
    assert response.usage.prompt_tokens == len(PROMPT)  # a character-level tokenizer
    assert response.usage.completion_tokens == len(expected.text) + 1  # the text and its EOS


def test_chat_without_a_template_sends_a_lone_user_message_as_plain_text(client):
    plain = client.completions.create(model="tiny", prompt=PROMPT).choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == plain
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    rendered = render_plain(conversation)
    assert rendered == f"System: be brief\n\nUser: {PROMPT}\n\nAssistant:"
    assert client.chat.completions.create(model="tiny", messages=conversation).usage.prompt_tokens == len(rendered)


def test_chat_renders_the_whole_conversation_with_the_tokenizers_template(tiny_policy):
    policy = copy.copy(tiny_policy)
    policy.tokenizer = copy.deepcopy(tiny_policy.tokenizer)
    policy.tokenizer.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                                      "{% if add_generation_prompt %}[assistant]{% endif %}")
    policy.chat_template = True
    conversation = [{"role": "user", "content": "sort 12\n"}, {"role": "assistant", "content": "12"},
                    {"role": "user", "content": PROMPT}]
    expected = "[user]sort 12\n[assistant]12[user]" + PROMPT + "[assistant]"
    with ServerThread(policy, model_name="chat") as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="-", max_retries=0)
        response = client.chat.completions.create(model="chat", messages=conversation, max_tokens=8)
    assert response.usage.prompt_tokens == len(expected)
    # what the plain policy completes for the rendered text (it is not formatted a second time)
    assert response.choices[0].message.content == tiny_policy.generate([expected], gen_length=8, steps=8,
                                                                        block_length=8)[0].text


def test_max_tokens_cuts_the_completion_and_says_so(client, tiny_policy):
    full = tiny_policy.generate([PROMPT])[0].text
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    choice = response.choices[0]
    assert len(choice.text) == 3 and choice.finish_reason == "length" and response.usage.completion_tokens == 3
    assert len(full) > 3
    longer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body={"steps": 12})
    assert len(longer.choices[0].text) <= 20


def test_max_tokens_on_a_block_schedule():
    defaults = {"gen_length": 64, "steps": 64, "block_length": 32}
    assert fit_schedule(100, defaults, {}) == {"block_length": 32, "gen_length": 128, "steps": 128}
    assert fit_schedule(10, defaults, {}) == {"block_length": 10, "gen_length": 10, "steps": 10}
    assert fit_schedule(10, defaults, {"block_length": 4, "steps": 6}) == {"block_length": 4, "gen_length": 12}
    half = {"gen_length": 64, "steps": 32, "block_length": 32}  # two tokens a step
    assert fit_schedule(96, half, {}) == {"block_length": 32, "gen_length": 96, "steps": 48}


def test_plan_names_what_is_wrong(tiny_policy):
    plan = plan_generation(tiny_policy, max_tokens=20, temperature=None, top_p=None, seed=None, extra={})
    assert (plan.options.gen_length, plan.options.block_length, plan.max_tokens) == (24, 8, 20)
    with pytest.raises(RequestError, match="steps=5 must be a multiple of the number of blocks"):
        plan_generation(tiny_policy, max_tokens=20, temperature=None, top_p=None, seed=None, extra={"steps": 5})
    with pytest.raises(RequestError, match="too many tokens: the prompt has 250 tokens"):
        plan_generation(tiny_policy, max_tokens=20, temperature=None, top_p=None, seed=None, extra={},
                        max_model_len=256, prompt_tokens=250)


def test_n_samples_and_seeds(client):
    first = client.completions.create(model="tiny", prompt=PROMPT, n=6, temperature=1.5, seed=7)
    again = client.completions.create(model="tiny", prompt=PROMPT, n=6, temperature=1.5, seed=7)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == list(range(6))
    assert texts == [c.text for c in again.choices]  # a seed makes a request reproducible
    assert len(set(texts)) > 1  # sampled rows differ: the temperature reached the sampler
    two = client.completions.create(model="tiny", prompt=["sort 12\n", "sort 9381\n"], n=2)
    assert len(two.choices) == 4 and two.choices[0].text == two.choices[1].text  # greedy: n copies agree


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="tiny", prompt=PROMPT).choices[0].text
    choice = client.completions.create(model="tiny", prompt=PROMPT, stop=[full[2:4]]).choices[0]
    assert choice.text == full[:2] and choice.finish_reason == "stop"


@pytest.mark.parametrize("fields,status,message", [
    ({"model": "gpt-4"}, 404, "unknown model 'gpt-4'; this server serves 'tiny'"),
    ({"max_tokens": "many"}, 400, "max_tokens: Input should be a valid integer, got 'many'"),
    ({"temperature": -1}, 400, "temperature: Input should be greater than or equal to 0"),
    ({"max_tokens": 1000}, 400, "too many tokens: the prompt has 12 tokens and max_tokens=1000"),
    ({"extra_body": {"stepz": 4}}, 400, "unsupported field(s) 'stepz'"),
    ({"extra_body": {"remasking": "best"}}, 400, "remasking must be one of"),
    ({"extra_body": {"sampler": "nope"}}, 400, "unknown sampler 'nope'"),
    ({"extra_body": {"sampler": "block_diffusion"}}, 400, "block_diffusion decodes block-causal models"),
    ({"top_p": 0.5}, 400, "top_p=0.5 is not supported by sampler 'llada'"),
    ({"stream": True}, 400, "stream=true is not supported"),
    ({"n": 1000}, 400, "n=1000 is over this server's limit of 64"),
])
def test_bad_requests_get_a_4xx_naming_the_field(client, fields, status, message):
    request = dict(model="tiny", prompt=PROMPT)
    request.update(fields)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**request)
    assert caught.value.status_code == status
    assert message in caught.value.body["message"]


def test_concurrent_requests_share_one_sampler_call_per_setting(tiny_policy):
    prompts = ["sort 583920\n", "sort 12\n", "sort 9381\n", "sort 4040\n"]
    alone = [c.text for c in tiny_policy.generate(prompts)]
    # A long collection window that a full batch (4 rows) cuts short, so the grouping is deterministic.
    with ServerThread(tiny_policy, model_name="tiny", max_batch_size=4, batch_wait_ms=30_000,
                      api_key="secret") as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="secret", max_retries=0, timeout=120)
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p).choices[0].text,
                                  prompts))
        assert running.batcher.stats.calls == [4]
        assert texts == alone  # greedy rows compute what they compute alone
        steps = [{"steps": 8}, {"steps": 4}, {"steps": 8}, {"steps": 4}]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda args: client.completions.create(model="tiny", prompt=args[0], extra_body=args[1]),
                          zip(prompts, steps)))
        assert running.batcher.stats.calls[1:] == [2, 2]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.base_url, api_key="wrong", max_retries=0).models.list()


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            return process.stdout.readline()
        if process.poll() is not None:
            break
    raise AssertionError(f"no line from the server (exit code {process.poll()}): {process.stderr.read()}")


def test_the_command_serves_on_a_free_loopback_port_and_stops_on_ctrl_c():
    process = subprocess.Popen([sys.executable, "-m", "dare_gym", "serve", "tiny", "--port", "0",
                                "--gen", "steps=4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(process, 120)
        assert "serving 'tiny' at http://127.0.0.1:" in line
        base_url = line.split(" at ", 1)[1].split()[0]
        client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=3, timeout=60)
        deadline = time.monotonic() + 60
        while True:  # the socket is bound before uvicorn accepts: retry connection errors briefly
            try:
                text = client.completions.create(model="tiny", prompt=PROMPT).choices[0].text
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert text.isdigit()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
    (["no_such_policy_dir"], "policy: no policy folder 'no_such_policy_dir'"),
    (["--gen", "steps=abc"], "--gen.steps: expected an integer, got 'abc'"),
])
def test_serve_errors_are_one_line(argv, message, capsys):
    from dare_gym.tools.cli import main

    assert main(["serve", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dare-gym serve: error: ") and "\n" not in error and message in error


def test_serve_names_a_taken_port(tiny_policy, capsys):
    from dare_gym.tools.cli import main

    with ServerThread(tiny_policy, model_name="tiny") as running:
        assert main(["serve", "tiny", "--port", str(running.port)]) == 2
    error = capsys.readouterr().err.strip()
    assert f"--host 127.0.0.1 --port {running.port}: " in error and "in use" in error


@pytest.mark.parametrize("command,words", [("serve", ["--max-batch-size", "--batch-wait-ms", "127.0.0.1"]),
                                           ("opencompass", ["--datasets", "--custom-dataset", "--venv"]),
                                           ("eval", ["--suite", "--samples", "--k", "pass@k"])])
def test_the_new_commands_have_help(command, words):
    out = subprocess.run([sys.executable, "-m", "dare_gym", command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and all(word in out.stdout for word in words)


# ------------------------------------------------------------------------------ one request cannot stop it


def _post(server, path: str, content: bytes, headers: dict | None = None):
    import httpx

    return httpx.post(f"http://{server.host}:{server.port}{path}", content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def _health(server) -> int:
    import httpx

    return httpx.get(f"http://{server.host}:{server.port}/health", timeout=30).status_code


@pytest.mark.parametrize("fields,param,message", [
    ({"seed": 2**64}, "seed", "seed: Input should be less than 9223372036854775808"),
    ({"seed": -1}, "seed", "seed: Input should be greater than or equal to 0"),
    ({"extra_body": {"steps": 10**8}}, "steps", "steps=100000000 is more than gen_length=8"),
    ({"extra_body": {"steps": 10**9, "gen_length": 10**9}}, "max_tokens", "over the model's context of 256 tokens"),
    ({"extra_body": {"threshold": 0.5, "sampler": "fast_dllm", "factor": None, "steps": 8}}, None, None),
    ({"prompt": ["sort 1\n"] * 65}, "prompt", "65 prompts is over this server's limit of 64 a request"),
    ({"prompt": "9" * 5000}, "prompt", "prompt 0 has 5000 characters: more tokens than the model's context"),
    ({"stop": [str(i) for i in range(33)]}, "stop", "33 stop strings is over the limit of 32"),
])
def test_every_field_is_bounded_by_the_model(client, server, fields, param, message):
    request = dict(model="tiny", prompt=PROMPT)
    request.update(fields)
    if message is None:  # a bounded request of another sampler works
        assert client.completions.create(**request).choices[0].text
        return
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**request)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param
    assert message in caught.value.body["message"]
    assert _health(server) == 200 and client.completions.create(model="tiny", prompt=PROMPT).choices[0].text


@pytest.mark.parametrize("body,status,message", [
    (b'{"model": "tiny", "prompt": "caf\xe9"}', 400, "the request body is not UTF-8 (byte 0xe9 at offset 32)"),
    (b'{"model": "tiny", "prompt": "x", "temperature": Infinity}', 400, "Infinity is not a JSON number"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "NaN is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
    (b'{"model": "tiny", "prompt": "' + b"9" * (10 << 20) + b'"}', 413, "the request body is over this server's limit"),
])
def test_bodies_that_are_not_json_or_too_big_get_an_openai_shaped_error(server, client, body, status, message):
    response = _post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert _health(server) == 200 and client.completions.create(model="tiny", prompt=PROMPT).choices[0].text


def test_unknown_routes_and_infinite_temperatures_get_openai_shaped_errors(server):
    import httpx

    missing = httpx.get(f"http://{server.host}:{server.port}/v1/engines", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    # Python's json reads 1e999 as infinity: the field itself refuses it
    response = _post(server, "/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": 1e999}')
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


def test_a_small_request_does_not_wait_behind_a_big_one(tiny_policy):
    """Fair scheduling: a request of one row sent while a request of 128 rows is being generated (2 rows per
    call, so 64 calls) is answered before the big one, with the same or with other sampler settings."""
    with ServerThread(tiny_policy, model_name="tiny", max_batch_size=2, batch_wait_ms=0) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="-", max_retries=0, timeout=300)
        finished = []

        def big():
            client.completions.create(model="tiny", prompt=[PROMPT] * 8, n=16)
            finished.append("big")

        def small(extra):
            client.completions.create(model="tiny", prompt="sort 12\n", extra_body=extra)
            finished.append(f"small {extra}")

        with ThreadPoolExecutor(3) as pool:
            done = pool.submit(big)
            deadline = time.monotonic() + 60
            while not running.batcher.stats.calls:  # the big one is being generated
                assert time.monotonic() < deadline and not done.done()
                time.sleep(0.005)
            smalls = [pool.submit(small, extra) for extra in ({}, {"steps": 4})]
            for future in [done, *smalls]:
                future.result()
        assert finished[-1] == "big", finished
        assert max(running.batcher.stats.calls) == 2 and sum(running.batcher.stats.calls) == 130


DEADLY_SAMPLER = '''
from dare_gym.samplers import register_sampler
from dare_gym.samplers.llada import LLaDASampler


@register_sampler("deadly")
class Deadly(LLaDASampler):
    """A sampler with a bug that kills the thread it runs in (what a BaseException does)."""

    def __call__(self, *args, **kwargs):
        raise SystemExit("a bug in a plugin sampler")
'''


def test_a_dead_worker_fails_health_and_the_server_exits(tmp_path):
    plugin = tmp_path / "deadly_sampler.py"
    plugin.write_text(DEADLY_SAMPLER)
    process = subprocess.Popen([sys.executable, "-m", "dare_gym", "serve", "tiny", "--port", "0", "--import",
                                str(plugin)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(process, 120)
        base_url = line.split(" at ", 1)[1].split()[0]
        client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while True:  # the socket is bound before uvicorn accepts
            try:
                assert client.completions.create(model="tiny", prompt=PROMPT).choices[0].text
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny", prompt=PROMPT, extra_body={"sampler": "deadly"})
        assert caught.value.status_code == 503 and "the batching worker died" in caught.value.body["message"]
        import httpx

        try:  # until it has shut down, it says it is not healthy
            status = httpx.get(base_url.replace("/v1", "/health"), timeout=30).status_code
        except httpx.TransportError:
            status = None
        assert status in (503, None)
        assert process.wait(timeout=60) == 1  # it shut down by itself
        assert "the batching worker died: SystemExit: a bug in a plugin sampler" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
