"""``dare-gym eval --suite``: the pass@k estimator, the tables, and a real suite run of two policies."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, strategies as st

from dare_gym.tools.suite import BenchmarkSpec, SuiteConfig, markdown_tables, mean_pass_at_k, pass_at_k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (c of them correct) that hold a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


@given(st.integers(1, 400), st.data())
def test_pass_at_k_matches_the_binomial_formula_and_grows_with_k(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= pass_at_k(n, c, k) - 1e-12
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the share of correct samples


@pytest.mark.parametrize("args,message", [((4, 5, 1), "c=5 correct samples out of n=4"),
                                          ((4, 1, 5), "k must be in [1, n=4], got k=5"),
                                          ((4, 1, 0), "k must be in [1, n=4], got k=0"),
                                          ((4, -1, 1), "c must be a non-negative integer, got -1")])
def test_pass_at_k_names_bad_counts(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pass_at_k(*args)


def test_mean_pass_at_k_averages_over_problems():
    assert mean_pass_at_k([0, 4, 2], 4, 1) == pytest.approx((0 + 1 + 0.5) / 3)
    assert mean_pass_at_k([0, 4, 2], 4, 4) == pytest.approx(2 / 3)


def test_suite_config_names_bad_settings():
    bench = [BenchmarkSpec("digitsort-v0")]
    with pytest.raises(ValueError, match=r"every k must be in \[1, samples=4\], got \[8\]"):
        SuiteConfig(bench, ["tiny"], num_samples=4, ks=[1, 8])
    with pytest.raises(ValueError, match="policy 'tiny' is given twice"):
        SuiteConfig(bench, ["tiny", "tiny"], num_samples=4, ks=[1])
    assert BenchmarkSpec.parse("gsm8k-v0:train") == BenchmarkSpec("gsm8k-v0", "train")
    assert BenchmarkSpec.parse("gsm8k-v0", "test").label == "gsm8k-v0"


def test_markdown_has_a_table_per_metric_with_benchmarks_as_rows_and_policies_as_columns():
    def cell(greedy, p1, p4):
        return {"records": 10, "greedy": greedy, "pass@1": p1, "pass@4": p4}

    report = {
        "config": {"policies": ["base", "tuned"], "benchmarks": ["gsm8k-v0", "countdown-v0"], "num_samples": 4,
                   "sample_temperature": 0.8},
        "metrics": ["greedy", "pass@1", "pass@4"],
        "results": {"base": {"gsm8k-v0": cell(0.765, 0.7, 0.9), "countdown-v0": cell(0.168, 0.1, 0.3)},
                    "tuned": {"gsm8k-v0": cell(0.856, 0.8, 0.95), "countdown-v0": cell(0.779, 0.7, 0.9)}},
    }
    text = markdown_tables(report)
    assert "| benchmark | base | tuned |" in text
    assert "| gsm8k-v0 (10) | 76.5 | 85.6 |" in text and "| countdown-v0 (10) | 16.8 | 77.9 |" in text
    assert text.count("| benchmark |") == 3 and "pass@4 (unbiased estimator, n=4 samples at temperature 0.8)" in text


from helpers import run_cli  # noqa: E402


def test_a_suite_of_two_policies_writes_json_and_tables(tmp_path, tiny_policy):
    copy = tmp_path / "tiny_copy"
    tiny_policy.save_pretrained(copy)
    out = run_cli("eval", "--suite", "digitsort-v0", "digitsort-v0:train", "--policy", "tiny", str(copy),
                  "--limit", "12", "--samples", "4", "--k", "1", "2", "4", "--output", str(tmp_path / "suite"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert report["metrics"] == ["greedy", "pass@1", "pass@2", "pass@4"]
    results = report["results"]
    assert set(results) == {"tiny", str(copy)}
    assert results["tiny"] == results[str(copy)]  # the same weights and seed: the same numbers
    for bench in ("digitsort-v0", "digitsort-v0:train"):
        row = results["tiny"][bench]
        counts = row["per_record"]["num_correct"]
        assert row["records"] == 12 and len(counts) == 12 and all(0 <= c <= 4 for c in counts)
        assert row["pass@1"] == pytest.approx(sum(counts) / 48)
        assert row["pass@1"] <= row["pass@2"] <= row["pass@4"]
        assert row["pass@4"] == pytest.approx(sum(c > 0 for c in counts) / 12)
    markdown = (tmp_path / "suite" / "suite.md").read_text()
    assert f"| benchmark | tiny | {copy} |" in markdown and markdown in out.stdout
    # the greedy column is what the single-env eval reports for the same records
    single = run_cli("eval", "--env", "digitsort-v0", "--limit", "12")
    assert json.loads(single.stdout)["accuracy"] == pytest.approx(results["tiny"]["digitsort-v0"]["greedy"])


@pytest.mark.parametrize("argv,message", [
    (["--suite", "nosuch-v0"], "--suite: unknown env 'nosuch-v0'; registered: "),
    (["--suite", "digitsort-v0:validation"], "--suite digitsort-v0:validation: split must be one of"),
    (["--suite", "digitsort-v0", "--samples", "4", "--k", "8"], "--suite: every k must be in [1, samples=4], got [8]"),
    (["--suite", "digitsort-v0", "--env", "digitsort-v0"], "--env: give the envs to --suite"),
    (["--policy", "tiny", "tiny"], "--policy: 2 policies given (tiny tiny); scoring several needs --suite"),
    (["--samples", "4"], "--samples applies to --suite only"),
])
def test_suite_errors_are_one_line(argv, message, capsys):
    from dare_gym.tools.cli import main

    assert main(["eval", "--limit", "2", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dare-gym eval: error: ") and "\n" not in error and message in error
