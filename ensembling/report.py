"""What a run reports besides the article's table: the full table, plots and costs.

full table   every subset of members under every rule, with test error,
             NLL, ECE, Brier, member disagreement, oracle error and the gain
             over the best member (terminal, results.json, results.md)
per class    each class's test error, of each member and of their average
             (results.json, results.md)
plots        per-member training curves from the CSV logs, and the test error
             of every row (PNG files in the logs folder)
costs        parameters, bytes of float32 weights and of the checkpoint files
             (Keras 3 stores Adam's moments in them too), latency per image at
             batch 1 and throughput at batch 256, for members and average
             ensembles, and each ensemble's latency against its members' sum
"""

import csv
import dataclasses
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import keras
import numpy as np

from ensembling import backend
from ensembling.checkpoints import replace_text, replacing
from ensembling.prediction import ensemble

RESULTS_STEM = "results"  # results.json and results.md in --logs-dir

COLUMNS = (
    ("test_error", "test error"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    ("disagreement", "disagree"),
    ("oracle_error", "oracle err"),
    ("gain", "gain"),
    ("gain_p", "p(gain)"),
)
LATENCY_CALLS = 20  # batch-1 calls timed after warm-up; the median is reported
THROUGHPUT_BATCH = 256
THROUGHPUT_CALLS = 3


def aligned(header, lines, right_from=1):
    """Rows of strings as one aligned table: text left, numbers right."""
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < right_from else f"{{:>{w}}}" for i, w in enumerate(widths))
    rule = fmt.format(*("-" * w for w in widths))
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*cells) for cells in lines)])


def _cells(row):
    return [row["row"]] + [_number(key, row.get(key)) for key, _ in COLUMNS]


def _number(key, value):
    if value is None:
        return "-"
    if key == "gain_p" and value < 5e-5:
        return "<0.0001"  # not 0.0000: a p-value is never zero
    return f"{value:.4f}"


def full_table(rows):
    return aligned(["row", *(title for _, title in COLUMNS)], [_cells(row) for row in rows])


def selection_note(rows):
    """What ensemble selection kept from the most members it chose among, or None:
    the row's name says which models it was given, this line which it used."""
    selected = [row for row in rows if row["rule"] == "select"]
    if not selected:
        return None
    row = max(selected, key=lambda r: len(r["members"]))  # the first of the largest pool
    pairs = list(zip(row["members"], row["weights"], strict=True))
    kept = ", ".join(f"{name} {weight:.2f}" for name, weight in pairs if weight > 0)
    left = [name for name, weight in pairs if weight == 0]
    out = f"; left out {', '.join(left)}" if left else "; none left out"
    return f"{row['row']} kept {kept} (their weights){out}"


def temperature_note(rows):
    """The temperature fitted for each `temperature` row, or None: above 1, its plain
    outputs were overconfident on the validation images; below 1, underconfident."""
    fitted = [row for row in rows if row["rule"] == "temperature"]
    if not fitted:
        return None
    each = ", ".join(
        f"{row['row'].removesuffix(' (temperature)')} {row['temperature']:.2f}" for row in fitted
    )
    return f"temperatures fitted on the validation images (above 1: overconfident before): {each}"


def table_notes(rows):
    """The lines printed under the full table: what its fitted rules chose."""
    return [note for note in (selection_note(rows), temperature_note(rows)) if note]


def markdown_table(rows, per_class=None):
    """The full table in Markdown, then, if given, `per_class` (`per_class_errors`'s
    {"classes": names, row: errors}) as a table of classes by rows."""
    header = ["row", "members", "rule", *(title for _, title in COLUMNS)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 3 + "---:|" * len(COLUMNS),
    ]
    for row in rows:
        cells = _cells(row)
        cells[1:1] = ["+".join(row["members"]), row["rule"]]
        lines.append("| " + " | ".join(cells) + " |")
    notes = table_notes(rows)
    if notes:
        lines += ["", *notes]
    if per_class:
        named = {row: errors for row, errors in per_class.items() if row != "classes"}
        lines += ["", "Test error per class:", "", "| class | " + " | ".join(named) + " |"]
        lines.append("|---|" + "---:|" * len(named))
        for k, name in enumerate(per_class["classes"]):
            cells = [_number("test_error", errors[k]) for errors in named.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def plot_training_curves(logs_dir, names):
    """One PNG per member with logged epochs: accuracy and loss, train and validation."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    written = []
    for name in names:
        log = Path(logs_dir) / f"{name}.csv"
        if not log.is_file():
            continue
        with open(log, newline="") as file:
            epochs = list(csv.DictReader(file))
        if not epochs:
            continue
        x = [int(e["epoch"]) + 1 for e in epochs]
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        for axis, metric in zip(axes, ("acc", "loss"), strict=True):
            axis.plot(x, [float(e[metric]) for e in epochs], marker="o", label="train")
            axis.plot(x, [float(e[f"val_{metric}"]) for e in epochs], marker="o", label="val")
            axis.set(xlabel="epoch", ylabel=metric, title=f"{name}: {metric}")
            axis.grid(alpha=0.3)
            axis.legend()
        figure.tight_layout()
        path = Path(logs_dir) / f"{name}_curves.png"
        _save_figure(figure, path)
        written.append(path)
    return written


def _save_figure(figure, path):
    """As results.json: whole or not at all, so a full disk keeps the last run's plot."""
    import matplotlib.pyplot as plt

    try:
        with replacing(path) as temporary:
            figure.savefig(temporary, dpi=100, format="png")
    finally:
        plt.close(figure)


def plot_test_errors(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["row"] for row in rows][::-1]
    errors = [row["test_error"] for row in rows][::-1]
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    bars = axis.barh(labels, errors, color="tab:blue")
    axis.bar_label(bars, fmt="%.4f", padding=3, fontsize=8)
    axis.set(xlabel="test error", title="test error of every member and ensemble")
    axis.set_xlim(0, max(errors) * 1.2 if max(errors) > 0 else 1)
    figure.tight_layout()
    _save_figure(figure, path)
    return Path(path)


# --------------------------------------------------------------------------- costs


def measure_cost(model, sample):
    """Parameters, median batch-1 latency (ms) and batch-256 throughput (images/s)."""
    one = sample[:1]
    batch = np.resize(sample, (THROUGHPUT_BATCH, *sample.shape[1:])).astype(sample.dtype)
    for _ in range(3):  # compile and warm up both shapes
        model.predict_on_batch(one)
    model.predict_on_batch(batch)
    latencies = []
    for _ in range(LATENCY_CALLS):
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(one))
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(THROUGHPUT_CALLS):
        np.asarray(model.predict_on_batch(batch))
    elapsed = time.perf_counter() - start
    return {
        "parameters": int(model.count_params()),
        "latency_ms": round(1000 * statistics.median(latencies), 3),
        "images_per_second": round(THROUGHPUT_BATCH * THROUGHPUT_CALLS / elapsed, 1),
    }


def ensemble_cost(model, sample, weight_bytes, members, costs):
    """`measure_cost` of an ensemble `model`, with the size of its files and its batch-1
    latency against the sum of its `members'` (each already in `costs`)."""
    cost = {**measure_cost(model, sample), "weight_bytes": weight_bytes}
    cost["latency_vs_members"] = cost["latency_ms"] / sum(costs[n]["latency_ms"] for n in members)
    return cost


def cost_table(costs, files="checkpoint MB"):
    """`files`: what `weight_bytes` measures, the training checkpoints (ensemble.py's,
    with Adam's state) or the saved model files (combine's)."""
    header = [
        "model or ensemble",
        "params",
        "weights MB",
        files,
        "ms/image @1",
        "images/s @256",
        "vs members",
    ]
    lines = []
    for name, cost in costs.items():
        ratio = cost.get("latency_vs_members")
        lines.append(
            [
                name,
                f"{cost['parameters']:,}",
                f"{cost['parameters'] * 4 / 1e6:.2f}",  # float32, as exported
                f"{cost['weight_bytes'] / 1e6:.2f}",  # the files (checkpoints: Adam's too)
                f"{cost['latency_ms']:.2f}",
                f"{cost['images_per_second']:.0f}",
                "-" if ratio is None else f"{ratio:.2f}x",
            ]
        )
    return aligned(header, lines)


def machine():
    """This machine in the words a benchmark prints beside its figures."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def save_results(settings, rows, extra, stem=RESULTS_STEM, markdown=None):
    """<stem>.json (settings, every row, `extra`, the environment) and <stem>.md (the
    full table, or the `markdown` given).

    `settings` is a dataclass (ensemble.py's) or a dict (combine's and distill's), with
    `logs_dir`, the folder both files go to.
    """
    settings = settings if isinstance(settings, dict) else dataclasses.asdict(settings)
    path = Path(settings["logs_dir"]) / f"{stem}.json"
    payload = {
        "settings": settings,
        "results": rows,
        **extra,
        "environment": {
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "devices": backend.devices(),
        },
    }
    # Whole or not at all: a full disk leaves the previous run's results as they were.
    replace_text(path, json.dumps(payload, indent=2) + "\n")
    markdown = markdown or markdown_table(rows, extra.get("per_class_errors"))
    replace_text(path.with_suffix(".md"), markdown)
    return path


def format_table(rows):
    """One aligned table: row, members, our test error, the article's."""
    header = ("model or ensemble", "members", "test error", "article")
    lines = [
        (r["row"], "+".join(r["members"]), f"{r['test_error']:.4f}", f"{r['article_error']:.4f}")
        for r in rows
        if r.get("article_error") is not None
    ]
    return aligned(header, lines, right_from=2)


def measure_costs(members, sample, ensembles):
    """The article's warning in numbers, for ensemble.py and combine alike: each member
    ({name: (model, file bytes)}), then each ensemble ({label: (model, file bytes,
    member names)}) with its batch-1 latency against the sum of its members'."""
    costs = {}
    for name, (model, size) in members.items():
        costs[name] = {**measure_cost(model, sample), "weight_bytes": size}
    for label, (model, size, names) in ensembles.items():
        costs[label] = ensemble_cost(model, sample, size, names, costs)
    return costs


def every_average(members, model_input):
    """The cost table's ensembles of ensemble.py: the average of every subset of two or
    more `members` ({name: (model, file bytes)}), keyed by its members joined by "+" (an
    exported file costs what the ensemble of its members does, give or take its
    combining layers)."""
    ensembles = {}
    for size in range(2, len(members) + 1):
        for names in itertools.combinations(members, size):
            combined = ensemble([members[n][0] for n in names], model_input)
            files = sum(members[n][1] for n in names)
            ensembles["+".join(names)] = (combined, files, names)
    return ensembles
