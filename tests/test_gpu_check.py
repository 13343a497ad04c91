"""experiments/gpu_check.py runs its whole code path on CPU with tiny shapes (the GPU runs it where one is lent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "experiments" / "gpu_check.py"


def test_gpu_check_runs_every_part_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = ["tiny parity", "tiny training", "sampler speed test", "compiled sampler test", "d1 update test",
             "llada2 sampler test", "llada2 update test"]
    assert all(part in results and "error" not in results[part] for part in parts), \
        {part: results.get(part, {}).get("error") for part in parts}
    assert results["tiny parity"]["all_identical"]
    rows = results["sampler speed test"]["rows"]
    assert {row["sampler"] for row in rows} == {"llada", "fast_dllm dual cache", "fast_dllm dual cache + threshold 0.9"}
    by_sampler = {row["sampler"]: row for row in rows}
    assert by_sampler["fast_dllm dual cache"]["tokens_processed"] < by_sampler["llada"]["tokens_processed"]
    compiled = results["compiled sampler test"]["rows"]
    assert [row["sampler"] for row in compiled] == ["llada", "fast_dllm dual cache"]
    assert all(row["same_tokens"] for row in compiled)  # float32 on CPU: the captured graph computes the same
    assert "## torch_compile" in (tmp_path / "gpu_check.md").read_text()
    assert set(results["d1 update test"]["settings"]) == {"LoRA r=8", "full fine-tune + gradient checkpointing (beta=0)"}
    moe = results["llada2 sampler test"]
    assert moe["block_size"] == 32 and all(row["model_calls"] == 16 for row in moe["rows"])  # gen 16, 1 token a step
    assert results["llada2 update test"]["counted_peak_gib"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "GPU check on CPU" in table and "| llada |" in table
