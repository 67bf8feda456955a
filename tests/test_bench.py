"""bench/summary.py: the table gpu_check.sh prints last, from the files its steps wrote.

The benchmarks themselves run on a GPU (bench/RESULTS.md); this checks that the one
table a device call ends with reads every step's file, so a run's figures are not
lost to a KeyError at the end of 8 paid minutes.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import summary

ROWS = ["ConvPool-CNN-C", "ALL-CNN-C", "NIN", "ensemble of three"]


def run(epochs, seed, rate, joint):
    result = {"epochs": epochs, "seed": seed, "train_seconds": 100.0, "images_per_second": rate}
    if joint:
        result.update(first_epoch_seconds=12.0, later_epoch_seconds=2.87)
    return result


def results_file(errors):
    return {"results": [{"row": row, "test_error": e} for row, e in zip(ROWS, errors, strict=True)]}


def write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_summary_reads_a_seed_pair_a_rate_run_and_the_step_rates(tmp_path, capsys):
    # gpu_check.sh's default step (plain for 2 epochs, joint in full) ...
    write(tmp_path / "bench.json", {"results": {"plain": run(2, 0, 9000, False),
                                                "joint": run(20, 0, 33000, True)},
                                    "speedup": 3.67})  # fmt: skip
    write(tmp_path / "joint_results.json", results_file([0.25, 0.27, 0.33, 0.215]))
    # ... and its 'pair' step, whose runs are named after their seed.
    pair = {"plain seed 1": run(20, 1, 8900, False), "joint seed 1": run(20, 1, 33100, True)}
    write(tmp_path / "pair1" / "bench.json", {"results": pair, "speedup": 3.72})
    write(tmp_path / "pair1" / "plain_seed_1_results.json", results_file([0.26, 0.26, 0.34, 0.22]))
    write(tmp_path / "step.json", {"gflop_per_step": 118.9, "results": {
        "baseline": {"first_epoch_s": 19.5, "later_epoch_s": 2.957, "ms_per_step": 2.365},
        "autotune off": {"failed": "over 90 s"}}})  # fmt: skip

    assert summary.main(["--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split("  ")[0]: line for line in lines}
    assert "0.2500 / 0.2700 / 0.3300 / 0.2150" in table["joint (20 epochs)"]
    assert "0.2600 / 0.2600 / 0.3400 / 0.2200" in table["plain seed 1 (20 epochs)"]
    assert "joint seed 1 (20 epochs)" in table
    speedups = [line for line in lines if line.startswith("joint / plain")]
    assert "3.67x" in speedups[0] and "plain ran 2 epochs" in speedups[0]
    assert "3.72x" in speedups[1] and "plain ran" not in speedups[1]
    assert "2.365 ms a step, 50.3 TFLOP/s" in table["joint step: baseline"]
    assert "over 90 s" in table["joint step: autotune off"]
