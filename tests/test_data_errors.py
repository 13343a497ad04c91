"""Bad data files give a DataFormatError naming the file, the line (or record) and the field; missing data
a DataNotFoundError naming where it was looked for. Every case writes a real small bad file to tmp_path."""

from __future__ import annotations

import gzip
import json

import pytest

import dare_gym
from dare_gym.envs.data import DataFormatError, DataNotFoundError, read_jsonl
from dare_gym.envs.preference import load_hh_rlhf

GSM8K = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
MBPP = {"task_id": 600, "text": "Write a function to square a number.", "code": "def sq(x):\n    return x * x",
        "test_list": ["assert sq(2) == 4", "assert sq(3) == 9"], "test_setup_code": "", "challenge_test_list": []}
HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def inc(x):\n", "entry_point": "inc",
             "canonical_solution": "    return x + 1\n", "test": "def check(f):\n    assert f(1) == 2\n"}


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


# ------------------------------------------------------------------------------ encoding, compression
def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(jsonl(GSM8K) + '{"question": "Caf\xe9?", "answer": "#### 1"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 18 of the line\)"):
        dare_gym.make("gsm8k-v0", data_files=str(path))


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(GSM8K))
    assert dare_gym.make("gsm8k-v0", data_files=str(path)).record(0)["question"] == GSM8K["question"]


def test_gzip_data_under_a_plain_name_is_named(tmp_path):
    path = tmp_path / "packed.jsonl"
    path.write_bytes(gzip.compress(jsonl(GSM8K)))
    with pytest.raises(DataFormatError, match=r"packed\.jsonl: the file is gzip-compressed but its name does not "
                                              r"end in \.gz; rename it to packed\.jsonl\.gz"):
        dare_gym.make("gsm8k-v0", data_files=str(path))


def test_a_gz_name_on_plain_data_is_named(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(jsonl(HUMANEVAL))
    with pytest.raises(DataFormatError, match=r"HumanEval\.jsonl\.gz: the name ends in \.gz but the file is not "
                                              r"gzip-compressed \(it starts with b'\{\"'\)"):
        dare_gym.make("humaneval-v0", data_files=str(path))


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(HUMANEVAL) * 50)[:-40])
    with pytest.raises(DataFormatError, match=r"cut\.jsonl\.gz: corrupt or truncated gzip data after line \d+"):
        dare_gym.make("humaneval-v0", data_files=str(path))


def test_non_utf8_inside_gzip_names_the_line(tmp_path):
    path = tmp_path / "he.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(HUMANEVAL) + b"\n" + b'{"task_id": "\xff"}\n'))
    with pytest.raises(DataFormatError, match=r"he\.jsonl\.gz:3: not UTF-8 text \(byte 0xff"):
        dare_gym.make("humaneval-v0", data_files=str(path))


def test_good_gzip_reads_with_line_numbers(tmp_path):
    path = tmp_path / "ok.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" + jsonl(HUMANEVAL, HUMANEVAL)))
    records = read_jsonl(path)
    assert len(records) == 2 and records.lines == [2, 3] and records.where(1) == f"{path}:3: record 2"


# -------------------------------------------------------------------------------------- field types
@pytest.mark.parametrize(
    "change,message",
    [
        ({"test_list": "assert sq(2) == 4"}, r"field 'test_list' must be a non-empty list of str, got str 'assert sq"),
        ({"test_list": []}, r"field 'test_list' must be a non-empty list of str, got list \[\]"),
        ({"test_list": ["assert sq(2) == 4", 7]}, r"field 'test_list' must be a non-empty list of str"),
        ({"task_id": "six hundred"}, r"field 'task_id' must be an integer, got str 'six hundred'"),
        ({"task_id": 600.5}, r"field 'task_id' must be int or str, got float 600\.5"),
        ({"task_id": True}, r"field 'task_id' must be int or str, got bool True"),
        ({"text": None}, r"field 'text' must be str, got NoneType None"),
        ({"challenge_test_list": "assert sq(4) == 16"}, r"field 'challenge_test_list' must be a list of str"),
        ({"test_setup_code": ["import math"]}, r"field 'test_setup_code' must be str, got list"),
    ],
)
def test_mbpp_field_types_name_file_line_and_field(tmp_path, change, message):
    path = tmp_path / "mbpp.jsonl"
    path.write_bytes(jsonl(MBPP, {**MBPP, "task_id": 601, **change}))
    with pytest.raises(DataFormatError, match=rf"mbpp\.jsonl:2: record 2: {message}"):
        dare_gym.make("mbpp-v0", data_files=str(path))


def test_mbpp_accepts_a_task_id_written_as_digits(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_bytes(jsonl({**MBPP, "task_id": "600"}))
    env = dare_gym.make("mbpp-v0", data_files=str(path))
    assert env.record(0)["task_id"] == 600
    env.reset(options={"index": 0})
    assert env.step(env.demonstration(env.record(0)))[1] == 1.0


def test_other_readers_name_the_field(tmp_path):
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_bytes(jsonl(GSM8K, {"question": ["What", "is", "1?"], "answer": "#### 1"}))
    with pytest.raises(DataFormatError, match=r"gsm8k\.jsonl:2: record 2: field 'question' must be str, got list"):
        dare_gym.make("gsm8k-v0", data_files=str(gsm8k))
    no_gold = tmp_path / "no_gold.jsonl"
    no_gold.write_bytes(jsonl({"question": "q", "answer": "the answer is 4"}))
    with pytest.raises(DataFormatError, match=r"no_gold\.jsonl:1: record 1: field 'answer': "):
        dare_gym.make("gsm8k-v0", data_files=str(no_gold))
    math500 = tmp_path / "math500.jsonl"
    math500.write_bytes(jsonl({"problem": "1+1?", "solution": "\\boxed{2}", "answer": {"value": 2}}))
    with pytest.raises(DataFormatError, match=r"math500\.jsonl:1: record 1: field 'answer' must be str or int or fl"):
        dare_gym.make("math500-v0", split="test", data_files=str(math500))
    unboxed = tmp_path / "math.jsonl"
    unboxed.write_bytes(jsonl({"problem": "1+1?", "solution": "It is 2."}))
    with pytest.raises(DataFormatError, match=r"math\.jsonl:1: record 1: field 'solution' has no \\boxed"):
        dare_gym.make("math-v0", split="test", data_files=str(unboxed))
    humaneval = tmp_path / "he.jsonl"
    humaneval.write_bytes(jsonl({**HUMANEVAL, "test": ["assert f(1) == 2"]}))
    with pytest.raises(DataFormatError, match=r"he\.jsonl:1: record 1: field 'test' must be str, got list"):
        dare_gym.make("humaneval-v0", data_files=str(humaneval))


def test_countdown_and_sudoku_name_line_and_field(tmp_path):
    countdown = tmp_path / "cd.jsonl"
    countdown.write_bytes(jsonl({"input": "1,2,3", "output": "6"}, {"input": [1, 2, 3], "output": "6"}))
    with pytest.raises(DataFormatError, match=r"cd\.jsonl:2: record 2: field 'input' must be comma-separated integers"):
        dare_gym.make("countdown-v0", split="test", data_files=str(countdown))
    countdown.write_bytes(jsonl({"input": "1,2,3", "output": "six"}))
    with pytest.raises(DataFormatError, match=r"cd\.jsonl:1: record 1: field 'output' must be an integer .*got 'six'"):
        dare_gym.make("countdown-v0", split="test", data_files=str(countdown))
    sudoku = tmp_path / "sudoku.csv"
    sudoku.write_bytes(b"Puzzle,Solution\n3102200002100320,3142243142131324\n31022000021003,3142243142131324\n")
    with pytest.raises(DataFormatError, match=r"sudoku\.csv:3: field 'Puzzle' must be a 16-digit grid, got '3102200"):
        dare_gym.make("sudoku4-v0", split="test", data_files=str(sudoku))
    sudoku.write_bytes(b"Puzzle,Solution\n3102200002100320,3142243142131324\n\xff102200002100320,3142243142131324\n")
    with pytest.raises(DataFormatError, match=r"sudoku\.csv:3: not UTF-8 text \(byte 0xff"):
        dare_gym.make("sudoku4-v0", split="test", data_files=str(sudoku))
    sudoku.write_bytes(gzip.compress(b"Puzzle,Solution\n3102200002100320,3142243142131324\n"))
    with pytest.raises(DataFormatError, match=r"sudoku\.csv: the file is gzip-compressed"):
        dare_gym.make("sudoku4-v0", split="test", data_files=str(sudoku))


def test_hh_rlhf_wrong_types_are_errors_not_skips(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path.write_bytes(gzip.compress(jsonl(good, {"chosen": ["\n\nHuman: hi"], "rejected": "x"})))
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl\.gz:2: record 2: field 'chosen' must be str, got list"):
        load_hh_rlhf(data_files=str(path))


# ------------------------------------------------------------------------------------- missing data
def _no_hub(monkeypatch, error: Exception | None = None):
    """Make the hub unreachable at once; with no ``error``, any hub access fails the test."""
    import datasets

    def load_dataset(*args, **kwargs):
        if error is None:
            pytest.fail(f"the hub was asked for {args}")
        raise error

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_a_data_dir_that_does_not_exist_is_named_before_any_hub_access(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("DARE_GYM_DATA_DIR", str(missing))
    with pytest.raises(DataNotFoundError, match=rf"DARE_GYM_DATA_DIR='{missing}' does not exist\. Point it at a"):
        dare_gym.make("gsm8k-v0")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    monkeypatch.setenv("DARE_GYM_DATA_DIR", str(a_file))
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        load_hh_rlhf()
    dare_gym.make("countdown-v0")  # procedural: reads no file, so the variable does not matter
    path = tmp_path / "given.jsonl"
    path.write_bytes(jsonl(GSM8K))
    assert dare_gym.make("gsm8k-v0", data_files=str(path)).num_records == 1  # data_files wins


def test_a_file_missing_from_the_data_dir_names_the_path_looked_for(tmp_path, monkeypatch):
    _no_hub(monkeypatch, ConnectionError("no network"))
    monkeypatch.setenv("DARE_GYM_DATA_DIR", str(tmp_path))
    expected = tmp_path / "gsm8k" / "train.jsonl"
    with pytest.raises(DataNotFoundError) as caught:
        dare_gym.make("gsm8k-v0")
    message = str(caught.value)
    assert f"looked for {expected}" in message and "ConnectionError: no network" in message
    assert "add the file there, or pass data_files=<path>" in message
    with pytest.raises(DataNotFoundError, match=r"no hub copy and no local file: .*looked for .*/countdown_cd3_test"):
        dare_gym.make("countdown-v0", split="test")
    monkeypatch.delenv("DARE_GYM_DATA_DIR")
    with pytest.raises(DataNotFoundError, match="DARE_GYM_DATA_DIR is unset: pass data_files=<path>, or set it"):
        dare_gym.make("sudoku4-v0", split="test")
    with pytest.raises(DataNotFoundError, match="is a folder, not a file"):
        dare_gym.make("gsm8k-v0", data_files=str(tmp_path))


# ------------------------------------------------------------------------ records that could not be judged
def test_deep_nesting_and_overlong_numbers_name_line_record_and_field(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(jsonl(GSM8K) + b'{"question": "q", "answer": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    with pytest.raises(DataFormatError, match=r"deep\.jsonl:2: record 2: field 'answer' is nested too deeply"):
        dare_gym.make("gsm8k-v0", data_files=str(deep))
    long = tmp_path / "long.jsonl"
    long.write_bytes(jsonl(GSM8K) + b'{"question": "q", "answer": "#### 1", "meta": {"id": ' + b"7" * 5000 + b"}}\n")
    with pytest.raises(DataFormatError, match=r"long\.jsonl:2: record 2: field 'meta\.id' holds a number of more"):
        dare_gym.make("gsm8k-v0", data_files=str(long))


@pytest.mark.parametrize("name,content", [("empty.jsonl", b""), ("blank.jsonl", b"\n \n"),
                                          ("empty.jsonl.gz", gzip.compress(b"", mtime=0))])
def test_a_file_without_records_is_an_error_at_load_time(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    env_id = "humaneval-v0" if name.endswith(".gz") else "gsm8k-v0"
    with pytest.raises(DataFormatError, match=rf"{name.replace('.', '[.]')}: no records \(the file is empty"):
        dare_gym.make(env_id, data_files=str(path))


@pytest.mark.parametrize("answer", ["#### ", "####", "#### seventeen", "#### 3 or 4"])
def test_a_gsm8k_gold_that_is_not_a_number_is_named(tmp_path, answer):
    path = tmp_path / "gsm8k.jsonl"
    path.write_bytes(jsonl(GSM8K, {"question": "q", "answer": f"work\n{answer}"}))
    with pytest.raises(DataFormatError, match=r"gsm8k\.jsonl:2: record 2: field 'answer': a GSM8K answer must end "
                                              r"with '#### <number>'"):
        dare_gym.make("gsm8k-v0", data_files=str(path))


@pytest.mark.parametrize("change,message", [
    ({"test_list": ["sq(2) == 4"]}, r"field 'test_list\[0\]' has no assert, so any function would pass it"),
    ({"test_list": ["assert sq(2) == 4", "assert sq(3) = 9"]}, r"field 'test_list\[1\]' is not Python"),
    ({"challenge_test_list": ["print(sq(9))"]}, r"field 'challenge_test_list\[0\]' has no assert"),
    ({"test_setup_code": "import ("}, r"field 'test_setup_code' is not Python"),
    ({"test_list": ["assert 1 + 1 == 2"]}, r"field 'test_list': the asserts call no function the solution must"),
])
def test_mbpp_tests_that_could_not_judge_anything_are_named(tmp_path, change, message):
    path = tmp_path / "mbpp.jsonl"
    path.write_bytes(jsonl(MBPP, {**MBPP, "task_id": 601, **change}))
    with pytest.raises(DataFormatError, match=rf"mbpp\.jsonl:2: record 2: {message}"):
        dare_gym.make("mbpp-v0", data_files=str(path))


@pytest.mark.parametrize("change,message", [
    ({"test": "def test(candidate):\n    assert candidate(1) == 2\n"}, r"field 'test' defines no check\(candidate\)"),
    ({"test": "def check(candidate)\n    pass\n"}, r"field 'test' is not Python"),
    ({"entry_point": "inc()"}, r"field 'entry_point' must be a Python name, got 'inc\(\)'"),
    ({"entry_point": "dec"}, r"field 'entry_point': the prompt defines no function 'dec'"),
])
def test_humaneval_records_that_could_not_judge_anything_are_named(tmp_path, change, message):
    path = tmp_path / "he.jsonl"
    path.write_bytes(jsonl(HUMANEVAL, {**HUMANEVAL, "task_id": "HumanEval/1", **change}))
    with pytest.raises(DataFormatError, match=rf"he\.jsonl:2: record 2: {message}"):
        dare_gym.make("humaneval-v0", data_files=str(path))
