"""The benchmarks' own logic, on the CPU: summary.py's table and bench_seeds.py.

The benchmarks themselves run on a GPU (bench/RESULTS.md); this checks that the one
table a device call ends with reads every step's file, so a run's figures are not
lost to a KeyError at the end of 8 paid minutes, and that bench_seeds.py's test,
comparison, verdict and scheduling are right before a GPU call depends on them.
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import write_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_data
import bench_resize
import bench_seeds
import bench_subsets
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
    # ... and a seed pair (bench_train.py --plain-seeds 1 --seeds 1), named after the seed.
    pair = {"plain seed 1": run(20, 1, 8900, False), "joint seed 1": run(20, 1, 33100, True)}
    write(tmp_path / "pair1" / "bench.json", {"results": pair, "speedup": 3.72})
    write(tmp_path / "pair1" / "plain_seed_1_results.json", results_file([0.26, 0.26, 0.34, 0.22]))
    # ... and the parallel step (bench_train.py --parallel --no-joint --plain-epochs 5).
    together = {"plain": run(5, 0, 8000, False), "parallel": run(5, 0, 17000, False)}
    write(tmp_path / "parallel" / "bench.json", {"results": together, "speedup": None,
                                                 "parallel_speedup": 2.13})  # fmt: skip
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
    assert "17,000 member-images/s" in table["parallel (5 epochs)"]
    assert "2.13x" in table["--parallel / plain"]
    assert "2.365 ms a step, 50.3 TFLOP/s" in table["joint step: baseline"]
    assert "over 90 s" in table["joint step: autotune off"]


# bench_seeds.py: the comparison that decides whether --joint becomes the default.


def test_permutation_p_counts_the_splits_as_large_as_the_one_observed():
    # Four errors split two against two: 6 splits, differences 2, 2, 1, 1, 0, 0.
    assert bench_seeds.permutation_p([1, 2], [3, 4]) == pytest.approx(2 / 6)
    assert bench_seeds.permutation_p([1, 2], [2, 1]) == 1.0
    # Five against five, fully separated: only the observed split and its mirror.
    low, high = [0.26, 0.261, 0.262, 0.263, 0.264], [0.28, 0.281, 0.282, 0.283, 0.284]
    assert bench_seeds.permutation_p(low, high) == pytest.approx(2 / 252)


def test_permutation_p_samples_close_to_the_exact_value_when_splits_are_many(monkeypatch):
    plain, joint = [0.265, 0.268, 0.262, 0.27, 0.266], [0.27, 0.283, 0.276, 0.268]
    exact = bench_seeds.permutation_p(plain, joint)
    monkeypatch.setattr(bench_seeds, "EXACT_LIMIT", 10)
    monkeypatch.setattr(bench_seeds, "SAMPLES", 20_000)
    assert bench_seeds.permutation_p(plain, joint) == pytest.approx(exact, abs=0.01)
    assert 0.0 < exact < 0.1


def test_compare_skips_missing_errors_and_tests_only_with_two_runs_a_path():
    runs = [
        {"path": "plain", "errors": {"ALL-CNN-C": 0.26, "NIN": 0.33, "pair A": 0.21}},
        {"path": "plain", "errors": {"ALL-CNN-C": 0.27, "NIN": None}},  # NIN died
        {"path": "joint", "errors": {"ALL-CNN-C": 0.28, "NIN": 0.34}},
        {"path": "joint", "errors": {"ALL-CNN-C": 0.29, "NIN": 0.35}},
    ]
    table = bench_seeds.compare(runs)
    assert table["ALL-CNN-C"]["difference"] == pytest.approx(0.02)
    assert table["ALL-CNN-C"]["p"] == pytest.approx(2 / 6)
    assert table["NIN"]["plain"] == [0.33] and table["NIN"]["p"] is None
    assert table["pair A"]["joint"] == [] and table["pair A"]["difference"] is None
    text = bench_seeds.format_comparison(table)
    assert "0.2650 ± 0.0071 (2)" in text and "+0.0200" in text


def test_verdict_waits_for_five_runs_a_path_then_flags_any_row_at_p_below_005():
    def runs(path, errors, row="ALL-CNN-C"):
        return [{"path": path, "errors": {row: e, "pair A": 0.2}} for e in errors]

    same = [0.26, 0.27, 0.265, 0.262, 0.268]
    few = bench_seeds.compare(runs("plain", same[:4]) + runs("joint", same))
    assert bench_seeds.verdict(few).startswith("undecided: ALL-CNN-C has 4 plain run(s)")
    alike = bench_seeds.compare(runs("plain", same) + runs("joint", [e + 0.001 for e in same]))
    assert bench_seeds.verdict(alike).startswith("within noise")
    worse = bench_seeds.compare(runs("plain", same) + runs("joint", [e + 0.02 for e in same]))
    assert bench_seeds.verdict(worse) == (
        "the paths differ: ALL-CNN-C +0.0200 (p 0.008); --joint stays opt-in"
    )


def test_the_earlier_gpu_runs_file_reads_and_bad_files_are_refused(tmp_path, capsys):
    runs = bench_seeds.read_runs(Path(bench_seeds.ROOT) / "bench" / "seed_runs.json")
    assert {r["path"] for r in runs} == {"plain", "joint"}
    bad = tmp_path / "runs.json"
    bad.write_text(json.dumps([{"path": "fast", "errors": {}}]))
    with pytest.raises(SystemExit) as stopped:
        bench_seeds.main(["--data-dir", "x", "--with", str(bad)])
    assert stopped.value.code == 2
    assert "each run needs a path (plain or joint)" in capsys.readouterr().err


def fake_run(tmp_path, path, seed, seconds, error, says=""):
    """A Run whose process prints `says`, sleeps, then writes the results.json
    ensemble.py would."""
    run = bench_seeds.Run(path, seed, tmp_path, "unused", [])
    results = {
        "results": [{"row": "ALL-CNN-C", "rule": "average", "test_error": error},
                    {"row": "ALL-CNN-C (vote)", "rule": "vote", "test_error": 0.5}],
        "train_seconds": {"all_cnn": 1.0}, "attempts": {"all_cnn": 1}, "environment": {},
    }  # fmt: skip
    target = run.folder / "logs" / "results.json"
    run.command = [sys.executable, "-c", f"import pathlib, time; print({says!r}); "
                   f"time.sleep({seconds}); "
                   f"p = pathlib.Path({str(target)!r}); p.parent.mkdir(parents=True); "
                   f"p.write_text({json.dumps(results)!r})"]  # fmt: skip
    return run


def test_schedule_runs_in_parallel_and_keeps_each_runs_average_errors(tmp_path, capsys):
    died = "all_cnn died in epoch 2 (same output for every image); restarting from fresh"
    runs = [fake_run(tmp_path, "plain", 1, 0, 0.26), fake_run(tmp_path, "joint", 1, 0, 0.28),
            fake_run(tmp_path, "plain", 2, 0, 0.27, says=f"Epoch 2/20\n{died}")]  # fmt: skip
    outcomes = []
    bench_seeds.schedule(runs, 2, None, outcomes.append)
    assert sorted((o["path"], o["seed"], o["errors"]["ALL-CNN-C"]) for o in outcomes) == [
        ("joint", 1, 0.28), ("plain", 1, 0.26), ("plain", 2, 0.27)]  # fmt: skip
    assert all(set(o["errors"]) == {"ALL-CNN-C"} for o in outcomes)  # the article's rule only
    # Which member died, and when: the run's own log is in a temporary folder.
    restarts = {(o["path"], o["seed"]): o["restarts"] for o in outcomes}
    assert restarts == {("plain", 1): [], ("joint", 1): [], ("plain", 2): [died]}
    assert f"\n  {died}\n" in capsys.readouterr().out  # printed under its run's line


def test_schedule_stops_at_the_budget_and_starts_no_run_that_cannot_end(tmp_path, capsys):
    slow = [fake_run(tmp_path, "plain", seed, 60, 0.26) for seed in (1, 2)]
    outcomes = []
    bench_seeds.schedule(slow, 1, 1.5, outcomes.append)
    assert [o["failed"] for o in outcomes] == ["stopped at the budget"]
    assert slow[0].process.poll() is not None  # no process left behind
    assert slow[1].process is None
    # A path's slowest finished run says whether another one still fits.
    quick = [fake_run(tmp_path / "q", "plain", seed, 2, 0.26) for seed in (1, 2)]
    outcomes = []
    bench_seeds.schedule(quick, 1, 3.0, outcomes.append)
    assert quick[1].process is None
    assert "not started: plain seed 2" in capsys.readouterr().out


def test_summary_reads_the_seeds_comparison(tmp_path, capsys):
    runs = [{"path": "plain", "errors": {"ALL-CNN-C": 0.26}},
            {"path": "joint", "errors": {"ALL-CNN-C": 0.28}}]  # fmt: skip
    write(tmp_path / "seeds.json", {"parallel": 2, "wall_seconds": 300.0, "with": ["a.json"],
                                    "runs": [*runs, {"failed": "stopped at the budget"}],
                                    "comparison": bench_seeds.compare(runs),
                                    "verdict": "undecided: for the test"})  # fmt: skip
    assert summary.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seeds: 2 of 3 runs finished" in out and "with the runs in a.json" in out
    assert "plain 0.2600 (1), joint 0.2800 (1), joint - plain +0.0200" in out
    assert "undecided: for the test" in out


def test_bench_data_times_the_handover_and_checks_it(tmp_path, capsys):
    assert bench_data.main(["--data-dir", str(write_tree(tmp_path / "tree"))]) == 0
    out = capsys.readouterr().out
    assert "decode " in out and "(100 images)" in out and "faster per member process" in out


def test_bench_subsets_times_every_subset_against_the_default_beyond_six(capsys):
    assert bench_subsets.main(["--members", "3", "7", "--images", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 3 members: 3 + 3 + 1 rows averaged and as many calibrated (temperature), 3 + 1
    # under each of the four other rules, for which a member alone is itself.
    assert lines[2].split()[:4] == ["3", "every", "one", str(7 + 4 * 4 + 7)]
    assert lines[3].split()[:4] == ["7", "every", "one", str(127 + 4 * 120 + 127)]
    assert lines[4].split()[:2] == ["7", "each,"] and lines[4].split()[6] == str(15 + 4 * 8 + 15)


def test_bench_resize_times_keras_op_against_ours_and_checks_they_agree(capsys):
    assert bench_resize.main(["--photos", "3", "--sizes", "20", "40", "--to", "16"]) == 0
    out = capsys.readouterr().out
    assert "3 photos (" in out and "Keras' op " in out and "readers.resized " in out
    assert float(out.split("largest difference ")[1].split()[0]) <= 0.51


def test_summary_reads_the_distillation_step(tmp_path, capsys):
    rows = [
        {"row": "teacher (average of a+b+c)", "test_error": 0.129, "latency_ms": 3.0},
        {"row": "all_cnn alone (labels only)", "test_error": 0.16, "latency_ms": 1.1},
        {"row": "all_cnn_student (distilled)", "test_error": 0.135, "latency_ms": 1.0},
    ]
    write(tmp_path / "fast_distill.json", {"results": rows, "distill_seconds": 120.5})
    assert summary.main(["--out", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("distill (fast)"))
    assert "120.5 train" in line and "all_cnn_student (distilled) 0.1350" in line
    assert "latency 0.33x the teacher's" in line
