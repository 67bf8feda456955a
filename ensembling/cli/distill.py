"""`python ensemble.py distill`: one network (the student) trained on the ensemble's
predictions (the teacher), and one table that says what it keeps of the ensemble's
accuracy at what cost (ensembling/distillation.py trains it).

The teacher is by default the run's members in `--weights-dir` (`--models`), their
best checkpoints averaged as the article averages them; `--teacher` takes saved
classifiers instead (files or folders, as combine does), `--teacher-rule` another of
the export's rules. The student is one of the builders, trained under the run's
recipe flags (`--preset fast` and its options included), or a `.keras` file of one's
own. It is checkpointed, logged and resumed as a member is, under the name
`<architecture>_student`, and written whole to `--export` (default
`<weights-dir>/student.keras`), which `predict` and `keras.saving.load_model` take.
"""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import keras
import numpy as np

import data
from ensembling import backend, combination, distillation, export, prediction, report, training
from ensembling.checkpoints import BEST_SUFFIX, best_checkpoint, read_json, read_log
from ensembling.cli.checks import check_settings, check_training_images
from ensembling.cli.combine import model_files, model_names
from ensembling.cli.exits import exit_code
from ensembling.cli.options import parse_distill
from ensembling.errors import UsageError
from ensembling.train import build_member, load_members
from models import MODELS

RESULTS_STEM = "distill"  # distill.json and distill.md in --logs-dir
DEFAULT_STUDENT = "conv_pool_cnn"  # the article's most accurate member
COLUMNS = (
    ("test_error", "test error"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("brier", "Brier"),
    ("agreement", "agrees"),
)


def main(argv):
    return exit_code(
        "ensemble.py distill", lambda: _main(argv), "then run the same command again: it resumes"
    )


def _main(argv):
    settings, how = parse_distill(argv)
    # One network: --preset fast's joint step has no members to join here.
    settings = dataclasses.replace(settings, joint=False)
    check_settings(settings, trains_members=False)
    how = check(settings, how)
    print("settings:", json.dumps(dataclasses.asdict(settings)))
    print("distillation:", json.dumps(dataclasses.asdict(how)))
    print(f"keras {keras.__version__} on {keras.backend.backend()}: {', '.join(backend.devices())}")
    with backend.DtypePolicy(backend.resolve_precision(settings.precision)):
        rows, extra = run(settings, how)
    saved = {**dataclasses.asdict(settings), "distillation": dataclasses.asdict(how)}
    path = report.save_results(saved, rows, extra, RESULTS_STEM, markdown_table(rows))
    print()
    print(table(rows))
    print(f"\nresults saved to {path} and {path.with_suffix('.md')}")
    if importlib.util.find_spec("matplotlib") is not None:
        plots = report.plot_training_curves(Path(settings.logs_dir), [extra["student"]])
        print("plots: " + ", ".join(str(p) for p in plots))
    print(
        f"student saved to {extra['export']} (python ensemble.py predict --model {extra['export']})"
    )
    return 0


def check(settings, how):
    """`how` with its export path filled in, or a UsageError for a value that cannot
    work, before any data is read or file written."""
    if not 0 < how.temperature < math.inf:
        raise UsageError(f"--temperature must be a positive number, got {how.temperature}")
    if not 0 <= how.label_weight <= 1:
        raise UsageError(f"--label-weight must lie between 0 and 1, got {how.label_weight}")
    student = how.student
    if student is not None and student not in MODELS and not _is_file_name(student):
        raise UsageError(
            f"unknown student {student!r}; choose from {', '.join(MODELS)}, or give a .keras file"
        )
    if how.student_weights == "current" and (student is None or student in MODELS):
        raise UsageError("--student-weights current needs a --student FILE.keras to start from")
    Path(settings.weights_dir).mkdir(parents=True, exist_ok=True)
    Path(settings.logs_dir).mkdir(parents=True, exist_ok=True)
    target = how.export or str(Path(settings.weights_dir) / "student.keras")
    reads = [*how.teacher, *([student] if student and student not in MODELS else [])]
    export.check_output("--export", target, ".keras", reads=reads)
    return dataclasses.replace(how, export=target)


def _is_file_name(text):
    return Path(text).suffix in (".keras", ".h5") or Path(text).exists()


def run(settings, how):
    """Loads, distils, reloads the best student, scores; returns (rows, extra)."""
    keras.utils.set_random_seed(settings.seed)
    (x_train, y_train), (x_test, y_test) = _arrays(settings)
    custom = export.custom_objects(how.custom_objects)
    teachers, sources = _teachers(settings, how, x_train.shape[1:], x_test, custom)
    student, alone = _student(settings, how, x_train.shape[1:], custom)
    student, scores = distillation.student_logits(student, _student_label(how))
    split_at = math.floor(len(x_train) * (1 - settings.validation_split))  # as Keras
    train, validation = (
        (x_train[:split_at], y_train[:split_at]),
        (x_train[split_at:], y_train[split_at:]),
    )
    teacher = distillation.teacher_model(list(teachers.values()), how.teacher_rule, validation)
    seconds = distillation.train_student(
        student, scores, teacher, sources, (train, validation), settings, how
    )
    checkpoint = distillation.reload_best(student, settings)
    export.save(student, Path(how.export), data.CLASS_NAMES)
    # The table's three: the teacher's own probabilities, not their logarithm.
    probs_of_teacher = keras.Model(teacher.inputs, teacher.get_layer("teacher_logits").input)
    scored = {f"teacher ({how.teacher_rule} of {'+'.join(teachers)})": probs_of_teacher}
    if alone is not None:
        scored[f"{alone.name} alone (labels only)"] = alone
    scored[f"{student.name} (distilled)"] = student
    rows = score(scored, x_test, y_test[:, 0], settings)
    extra = {
        "student": student.name,
        "checkpoint": str(checkpoint),
        "export": how.export,
        "teacher_models": list(teachers),
        "distill_seconds": seconds,
    }
    return rows, extra


def _arrays(settings):
    """CIFAR-10 as training reads it, refusing a split too small to train on."""
    arrays = data.load_data(settings.data_dir, limit=settings.limit, seed=settings.seed)
    count = len(arrays[0][0])
    print(f"data: {data.describe_source(settings.data_dir)}: {count} training images")
    check_training_images(settings, count)
    return arrays


def _teachers(settings, how, image_shape, x_test, custom):
    """({name: model ending in class probabilities}, the files they come from): the
    `--teacher` files, or the best checkpoints of `--models` in `--weights-dir`. A
    student records those files: one of another teacher is not reused."""
    if not how.teacher:
        inputs = keras.Input(shape=image_shape)
        members = load_members(settings.models, inputs, settings.weights_dir)
        sources = [path.name for _, path in members.values()]
        return {name: model for name, (model, _) in members.items()}, sources
    paths = [found for given in how.teacher for found in model_files(given)]
    teachers = {}
    for name, path in zip(model_names([Path(p).absolute() for p in paths]), paths, strict=True):
        model = export.load(path, "--teacher", "saved by model.save", custom, how.safe_mode)
        export.check_fits(model, f"--teacher {path}", image_shape, data.NUM_CLASSES)
        model.name = name
        # One that outputs logits (or a sigmoid) is wrapped to output probabilities.
        teachers[name] = prediction.predict_probabilities(
            model, x_test[:64], 64, label=f"--teacher {path}"
        )[0]
    return teachers, [str(Path(path).resolve()) for path in paths]


def _student(settings, how, image_shape, custom):
    """(the student to train, the same architecture trained on labels alone or None)."""
    name = how.student or _best_member(settings)
    if name in MODELS:
        student = build_member(name, keras.Input(shape=image_shape), settings)
        student.name = f"{name}_student"
        alone = None
        if best_checkpoint(settings.weights_dir, name) is not None:
            alone = load_members([name], keras.Input(shape=image_shape), settings.weights_dir)
            alone = alone[name][0]
        else:
            print(
                f"note: no {name} trained on labels alone in {settings.weights_dir}/ to "
                f"compare with (python ensemble.py --models {name} trains it)"
            )
        return student, alone
    label = _student_label(how)
    student = export.load(name, "--student", "saved by model.save", custom, how.safe_mode)
    export.check_fits(student, label, image_shape, data.NUM_CLASSES)
    alone = None
    if how.student_weights == "current":  # the file as given is the one trained alone
        alone = export.load(name, "--student", "", custom, how.safe_mode)
    else:
        # NumPy's generator, seeded by set_random_seed: the same draw on every run.
        training.reinitialize(student, seed=int(np.random.randint(2**31 - 1)))
    stem = model_names([Path(name).absolute()])[0]
    student.name = f"{stem}_student"
    return student, alone


def _student_label(how):
    return f"--student {how.student}" if how.student else "the student"


def _best_member(settings):
    """The member of `--models` with the lowest validation error at its best epoch, in
    its log in `--logs-dir`; DEFAULT_STUDENT where no log says."""
    errors = {}
    for name in settings.models:
        record = read_json(Path(settings.weights_dir) / f"{name}{BEST_SUFFIX}") or {}
        logged = read_log(Path(settings.logs_dir) / f"{name}.csv")
        try:
            errors[name] = 1 - float(logged[record["epoch"] - 1]["val_acc"])
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # no record, no log, or a log without validation
    if not errors:
        print(f"student: {DEFAULT_STUDENT} (no member's validation error is logged)")
        return DEFAULT_STUDENT
    best = min(errors, key=errors.get)
    print(f"student: {best}, the member with the lowest validation error ({errors[best]:.4f})")
    return best


def score(models, x_test, labels, settings):
    """One row per model ({row: model}): test error, NLL, ECE, Brier, agreement with
    the first (the teacher)'s top class, parameters and speed on this device."""
    sample = x_test[: report.THROUGHPUT_BATCH]
    rows, teacher_top = [], None
    for row, model in models.items():
        probs = prediction.predict(model, x_test, settings.batch_size, settings.tta)
        top = np.argmax(probs, axis=1)
        teacher_top = top if teacher_top is None else teacher_top
        cost = report.measure_cost(model, sample) if settings.cost else {}
        rows.append(
            {
                "row": row,
                **combination.row_metrics(probs, [probs], labels),  # one model: the four
                "agreement": float(np.mean(top == teacher_top)),
                "parameters": int(model.count_params()),
                **cost,
            }
        )
    return rows


def _cells(row):
    cells = [row["row"], *(f"{row[key]:.4f}" for key, _ in COLUMNS)]
    cells += [f"{row['parameters']:,}", f"{row['parameters'] * 4 / 1e6:.2f}"]
    if "latency_ms" in row:
        cells += [f"{row['latency_ms']:.2f}", f"{row['images_per_second']:.0f}"]
    return cells


def _header(rows):
    header = ["model", *(title for _, title in COLUMNS), "params", "weights MB"]
    return header + (["ms/image @1", "images/s @256"] if "latency_ms" in rows[0] else [])


def table(rows):
    """The rows as one aligned table: the teacher, the student alone, the distilled one."""
    return report.aligned(_header(rows), [_cells(row) for row in rows])


def markdown_table(rows):
    header = _header(rows)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"
