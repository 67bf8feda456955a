"""`--parallel`: every member trained at the same time, each in a process of its own.

Each process runs `ensemble.py --models NAME --train-only` with this run's settings,
so a member is trained exactly as that one-member run would train it: its own `fit`
(the article's), its own batch order, checkpoints, logs and lock. Nothing is shared
but the device. With several GPUs each process gets one, in turn
(`CUDA_VISIBLE_DEVICES`): docs/gpu.md's one-member-per-GPU recipe in one command. On
one GPU they share it; at the article's batch of 32 a `fit` keeps an H100 busy only
part of the time, so they may fill each other's idle time (not yet measured:
`STEPS=parallel` in bench/gpu_check.sh).

The data is decoded once, here: the processes read this process's arrays from a
temporary file (`DATA_FILE`) instead of each decoding 60,000 JPEGs again (7 s each
against 0.5 s: bench/bench_data.py).

Their output is relayed line by line, each line prefixed with the member's name.
Ctrl-C, SIGTERM or SIGHUP stops them all; the same command then resumes each member
after its last completed epoch, as a run without `--parallel` would. The processes
run in sessions of their own (so that each gets exactly one SIGINT, from here): a
`kill -9` of this process leaves them training their members to the end.
"""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import data
from ensembling.errors import TrainingFailed
from ensembling.settings import settings_argv
from ensembling.training import stopping_on_signals

ENSEMBLE = Path(__file__).resolve().parents[1] / "ensemble.py"
# Without these, the first process on a GPU takes most of its memory: JAX reserves
# 75% of it at start, TensorFlow all of it. PyTorch allocates as it goes.
SHARE_A_GPU = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
# Where a member process finds the data this process decoded (see `handed_data`).
DATA_FILE = "ENSEMBLE_PARALLEL_DATA"
STOP_SECONDS = 60  # for a stopped process to end its epoch's files before it is killed


def share_the_gpu():
    """Lets this process and its children share a GPU; call before the backend opens one."""
    for key, value in SHARE_A_GPU.items():
        os.environ.setdefault(key, value)


def command(name, settings):
    """The command line that trains `name` alone, with `settings`, and stops.

    The exports are the main process's, after training: with --train-only a member
    process would refuse them (and ruin a --parallel --export run, as it did).
    """
    alone = dataclasses.replace(
        settings,
        models=(name,),
        parallel=False,
        train_only=True,
        export=None,
        export_rule="average",
        export_members=None,
    )
    return [sys.executable, str(ENSEMBLE), *settings_argv(alone)]


def data_key(settings):
    """What a process's arrays depend on: the same key, the same arrays."""
    return json.dumps(
        {
            "source": data.describe_source(settings.data_dir),
            "limit": settings.limit,
            "seed": settings.seed,
        }
    )


@contextlib.contextmanager
def handing_over(arrays, settings):
    """Saves `arrays` (`data.load_data`'s) for the member processes, while in the block.

    Yields the environment that points a process at them. If they could not be
    written (a small or full temporary folder), it names no file, and each process
    decodes the data itself, as it would without this.
    """
    with tempfile.TemporaryDirectory(prefix="ensemble-data-") as folder:
        path = Path(folder) / "data.npz"
        try:
            data.save_decoded(path, arrays, data_key(settings))
        except OSError as error:
            print(
                f"could not write the decoded data to {folder} ({error.strerror or error}): "
                "each member's process decodes it itself"
            )
            yield {DATA_FILE: ""}  # still marks the processes as members
        else:
            yield {DATA_FILE: str(path)}


def member_process():
    """Whether this process is one of `train`'s member processes."""
    return DATA_FILE in os.environ


def handed_data(settings):
    """In a member process: the arrays the parent decoded for `settings`, else None.

    None too when the file is gone or holds another selection (a stale variable in
    the user's shell, say): the caller then loads the data itself.
    """
    path = os.environ.get(DATA_FILE)
    if not path:
        return None
    try:
        return data.load_decoded(path, data_key(settings))
    except (OSError, ValueError, KeyError):
        return None


def gpu_for(index, gpus):
    """The `CUDA_VISIBLE_DEVICES` value of the `index`-th process, or None for the CPU."""
    if not gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
    return ids[index % len(ids)]


def train(names, settings, gpus=0, handover=None):
    """Trains `names` at once, one process each; returns {name: seconds}.

    `handover` (from `handing_over`) is added to each process's environment.

    Raises `TrainingFailed` naming the members whose process failed, once all have
    ended, and KeyboardInterrupt once every process has stopped after an interrupt.
    """
    processes, relays, started, seconds = {}, [], time.perf_counter(), {}
    for index, name in enumerate(names):
        environment = {**os.environ, **SHARE_A_GPU, "PYTHONUNBUFFERED": "1", **(handover or {})}
        device = gpu_for(index, gpus)
        if device is not None:
            environment["CUDA_VISIBLE_DEVICES"] = device
        where = f" on GPU {device}" if device is not None else ""
        argv = command(name, settings)
        print(f"training {name} in its own process{where}: {' '.join(argv)}")
        processes[name] = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
            start_new_session=True,  # Ctrl-C reaches this process only; it stops them once
        )
        relay = threading.Thread(target=_relay, args=(name, processes[name]), daemon=True)
        relay.start()
        relays.append(relay)
    try:
        # Ctrl-C, a scheduler's stop, a closed terminal: the processes stop with this one.
        with stopping_on_signals():
            while len(seconds) < len(processes):
                for name, process in processes.items():
                    if name not in seconds and process.poll() is not None:
                        seconds[name] = round(time.perf_counter() - started, 1)
                time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(processes)
        raise
    finally:
        for relay in relays:
            relay.join(timeout=5)
    failed = {name: p.returncode for name, p in processes.items() if p.returncode != 0}
    if failed:
        which = ", ".join(f"{name} (exit code {code})" for name, code in failed.items())
        raise TrainingFailed(
            f"training failed for {which}: its lines above say why; fix that and run the "
            "same command again (finished members are kept)"
        )
    return seconds


def _relay(name, process):
    for line in process.stdout:
        print(f"[{name}] {line}", end="", flush=True)


def _stop(processes):
    """SIGINT to every process still running, as Ctrl-C would (on Windows, which cannot
    send one, they stop at once), then SIGKILL to any still running after STOP_SECONDS."""
    running = [p for p in processes.values() if p.poll() is None]
    for process in running:
        if os.name == "posix":
            process.send_signal(signal.SIGINT)
        else:  # Windows cannot send Ctrl-C to one process: it stops at once
            process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
