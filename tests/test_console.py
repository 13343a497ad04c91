"""What a run prints: plain progress lines, the step bar, and reports of failing rewards."""

from __future__ import annotations

import io
import warnings

import numpy as np

from dare_gym.train.console import (
    RewardFailureMonitor,
    TrainingProgress,
    format_duration,
    quiet_library_warnings,
    remaining_seconds,
    rollout_reward_errors,
    status_line,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_durations_and_the_time_left_to_the_first_limit():
    assert [format_duration(s) for s in (0, 45.4, 271, 3720)] == ["0s", "45s", "4m31s", "1h02m"]
    assert remaining_seconds(10, 100, 2.0, 30.0, None) == 180.0  # steps decide
    assert remaining_seconds(10, 100_000, 2.0, 30.0, 300.0) == 270.0  # the time limit decides
    assert remaining_seconds(0, 100, None, 0.0, None) is None


def test_a_status_line_shows_what_is_known():
    line = status_line(10, {"reward_mean": 0.4123}, {"heldout_accuracy": 0.5}, 10, 2.9, 271)
    assert line == "step 10 | reward 0.412 | held-out acc 0.500 (step 10) | 2.90 s/step | 4m31s left"
    assert status_line(0, {}, {"heldout_accuracy": 0.39}, 0, None, None) == "step 0 | held-out acc 0.390 (step 0)"


def test_plain_lines_every_n_steps_when_the_output_is_not_a_terminal():
    out = io.StringIO()
    progress = TrainingProgress(max_steps=7, time_limit_s=None, start_step=0, start_elapsed=0.0, every=3,
                                stream=out, bar_stream=io.StringIO())
    for step in range(1, 8):
        progress.update(step, 2.0 * step, {"reward_mean": 0.5}, {}, None, last=step == 7)
    progress.close()
    steps = [line.split(" |")[0] for line in out.getvalue().splitlines()]
    assert steps == ["step 1", "step 3", "step 6", "step 7"]
    assert "2.00 s/step | 8s left" in out.getvalue().splitlines()[1]  # 4 steps of 2 s to go at step 3


def test_the_terminal_bar_counts_steps_and_shows_the_time_guard():
    bar = Terminal()
    progress = TrainingProgress(max_steps=150, time_limit_s=300.0, start_step=0, start_elapsed=0.0, every=10,
                                stream=io.StringIO(), bar_stream=bar)
    progress.update(27, 81.0, {"reward_mean": 0.41}, {"heldout_accuracy": 0.52}, 20)
    progress.close()
    text = bar.getvalue()
    assert "27/150" in text and "18%" in text and "acc=0.520" in text and "time=1m21s of 5m00s guard" in text


def test_nothing_is_shown_when_progress_is_off_but_messages_still_are():
    out, bar = io.StringIO(), Terminal()
    progress = TrainingProgress(max_steps=5, time_limit_s=None, start_step=0, start_elapsed=0.0, every=1,
                                enabled=False, stream=out, bar_stream=bar)
    progress.update(1, 1.0, {"reward_mean": 0.5}, {}, None)
    progress.message("warning: something")
    assert out.getvalue() == "warning: something\n" and bar.getvalue() == ""


def test_reward_errors_are_read_from_both_vector_info_layouts():
    per_rollout = {"reward_errors": np.array([{"fmt": "ValueError: x"}, None, {"fmt": "E", "len": "F"}], dtype=object),
                   "_reward_errors": np.array([True, False, True])}
    expected = [{"fmt": "ValueError: x"}, {}, {"fmt": "E", "len": "F"}]
    assert rollout_reward_errors(per_rollout, 3) == expected
    per_term = {"reward_errors": {"fmt": np.array(["ValueError: x", "", "E"], dtype=object),
                                  "_fmt": np.array([True, False, True]),
                                  "len": np.array([None, None, "F"], dtype=object), "_len": np.array([False, False, True])}}
    assert rollout_reward_errors(per_term, 3) == expected
    assert rollout_reward_errors({}, 2) == [{}, {}]


def test_a_failing_reward_is_reported_with_its_name_and_a_reason_once_per_interval():
    monitor = RewardFailureMonitor(every=10)
    mostly = [{"exact": "TimeoutError: timed out after 1 s"}] * 3 + [{}]
    half = [{"exact": "TimeoutError: timed out after 1 s"}] * 2 + [{}, {}]
    assert monitor.check(1, half) == []  # half is not most
    (message,) = monitor.check(2, mostly)
    assert message == ("warning: reward 'exact' failed on 3 of 4 rollouts at step 2 (they score 0 for it), "
                       "e.g. TimeoutError: timed out after 1 s")
    assert monitor.check(11, mostly) == []
    assert len(monitor.check(12, mostly)) == 1


def test_library_deprecation_notices_are_hidden_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_library_warnings():
            warnings.warn_explicit("old name", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("mine", FutureWarning, "x.py", 1, module="my_rewards")
    assert [str(w.message) for w in caught] == ["mine"]
