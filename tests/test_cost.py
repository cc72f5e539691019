"""benchmarks/cost.py end to end on a tiny sequence: both methods timed task by task, the ratios as the file says."""

from __future__ import annotations

import json

import cost


def test_cost_benchmark_times_both_methods_per_task_and_writes_the_ratios(tmp_path):
    argv = ["--tasks", "1", "2", "--quick", "--train_per_class", "6", "--test_per_class", "4"]
    cost.main([*argv, "--output_dir", str(tmp_path)])
    result = json.loads((tmp_path / "cost.json").read_text())
    assert result["tasks"] == [1, 2]
    assert len(result["lora_timings"]["train_s"]) == len(result["hyperlora_timings"]["train_s"]) == 2
    for row, train, total in zip(result["rows"], result["ratio_train"], result["ratio_total"], strict=True):
        assert train == row["hyperlora_train_s"] / row["lora_train_s"] > 0
        hyper = sum(row[f"hyperlora_{stage}"] for stage in cost.HYPERLORA_STAGES)
        assert total == hyper / (row["lora_train_s"] + row["lora_eval_s"])
    for inside, lora_train in zip(result["lora_timings"]["inside_s"], result["lora_timings"]["train_s"], strict=True):
        assert 0 < inside <= lora_train  # LoRA's steps ran between HyperLoRA's, and were taken out of its time
    assert "| 2 |" in (tmp_path / "cost.md").read_text()
