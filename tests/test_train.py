"""The trainer as real processes (`python -m memtrans.train`, torchrun): runs with every memory
mode, exact resume, local memory servers started and stopped, and bad input that stops with one
clear message."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from memory_server.client import MemoryClient
from memory_server.snapshot import list_snapshots, read_snapshot
from servers import free_port

pytestmark = pytest.mark.timeout(120)

TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16",
        "--memorizing-layers", "2", "--seq-len", "64", "--batch-size", "2", "--max-memories", "96",
        "--num-retrieved", "8", "--xl-max-memories", "64", "--warmup-steps", "0",
        "--lr", "3e-3", "--eval-batches", "4", "--log-every", "1", "--val-fraction", "0.25",
        "--documents", "file"]  # a flat directory of modules: one document each


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 standard-library files: a small slice of the default corpus (at least 4 validation
    documents, for 2 ranks x 2 rows)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 40_000)[:30]
    for path in files:
        shutil.copy(path, root / path.name)
    return root


def run(*args, env=None, timeout=100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtrans.train", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def figures(out: Path, kind: str) -> list[dict]:
    """The records without their timings (which no two runs share)."""
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in records(out, kind)]


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtrans-train: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def processes_with(text: str) -> list[int]:
    """Pids whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def inproc_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "inproc"
    result = run("--data", str(corpus), "--memory", "inproc", "--steps", "8", "--eval-every", "4",
                 "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    return out


def test_inproc_run_logs_losses_validation_and_checkpoint(inproc_run):
    train = records(inproc_run, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(math.isfinite(r["train_bpb"]) and r["tokens_per_s"] > 0 for r in train)
    coverage = [r["coverage"] for r in train]  # 2 rows of 64 tokens a step, ~4 KB documents
    assert {c["documents"] for c in coverage} == {coverage[0]["documents"]}
    assert coverage[0]["documents"] > 20
    tokens = [c["tokens"] for c in coverage]
    assert 0 < tokens[0] <= 128 and tokens == sorted(tokens) and tokens[-1] <= 8 * 128
    assert coverage[0]["documents_started"] == 2 and coverage[0]["epochs_covered"] > 0
    evals = records(inproc_run, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert math.isfinite(r["val_bpb_memory"]) and math.isfinite(r["val_bpb_no_memory"])
    # 4 segments of 64 with a 64-token XL window: the last two segments retrieve something.
    assert evals[-1]["val_bpb_memory"] != evals[-1]["val_bpb_no_memory"]
    assert (inproc_run / "checkpoint.pt").is_file()
    assert not list(inproc_run.glob("*.tmp"))


def test_resume_continues_exactly(corpus, inproc_run, tmp_path):
    """4 steps, then --resume to 8: the same per-step losses as the uninterrupted 8 steps (the
    kNN ring of 96 entries wraps by then, so the memory state is carried over for real)."""
    out = tmp_path / "resumed"
    first = run("--data", str(corpus), "--memory", "inproc", "--steps", "4", "--eval-every", "4",
                "--out", str(out), *TINY)
    assert first.returncode == 0, first.stderr
    second = run("--resume", str(out), "--steps", "8")
    assert second.returncode == 0, second.stderr
    resumed = [(r["step"], r["train_bpb"]) for r in records(out, "train")]
    whole = [(r["step"], r["train_bpb"]) for r in records(inproc_run, "train")]
    assert resumed == whole
    assert [r["coverage"] for r in records(out, "train")] == \
        [r["coverage"] for r in records(inproc_run, "train")]
    assert figures(out, "eval") == figures(inproc_run, "eval")


def test_resume_continues_exactly_with_ivf(corpus, tmp_path):
    """The same with --index ivf: its 3 lists train at step 3, the checkpoint of step 4 carries
    the centroids, and the retraining after the ring turns (step 5) happens in both runs."""
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    common = ("--data", str(corpus), "--memory", "inproc", "--index", "ivf", "--eval-every", "4")
    results = [run(*common, "--steps", "8", "--out", str(whole), *TINY),
               run(*common, "--steps", "4", "--out", str(out), *TINY),
               run("--resume", str(out), "--steps", "8")]
    for result in results:
        assert result.returncode == 0, result.stderr
    assert [(r["step"], r["train_bpb"]) for r in records(out, "train")] == \
        [(r["step"], r["train_bpb"]) for r in records(whole, "train")]
    assert figures(out, "eval") == figures(whole, "eval")


def test_default_corpus_is_stdlib_packages_and_the_log_says_how_much_was_read(tmp_path):
    flags = list(TINY)
    for flag in ("--documents", "--val-fraction"):  # the defaults: packages, 0.1
        del flags[flags.index(flag):flags.index(flag) + 2]
    out = tmp_path / "packages"
    result = run("--memory", "off", "--steps", "2", "--eval-every", "0", "--out", str(out), *flags)
    assert result.returncode == 0, result.stderr
    assert "standard library, package documents of at most 262144 bytes" in result.stdout
    coverage = records(out, "train")[-1]["coverage"]
    assert coverage["documents"] > 40 and coverage["documents_started"] == 2
    assert coverage["tokens"] == 2 * 2 * 64 and coverage["epochs_covered"] == 2 / coverage[
        "documents"]


def test_memory_off_trains_without_retrieval(corpus, tmp_path):
    out = tmp_path / "off"
    result = run("--data", str(corpus), "--memory", "off", "--steps", "3", "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    assert all(math.isfinite(r["train_bpb"]) for r in records(out, "train"))
    (evaluation,) = records(out, "eval")
    assert evaluation["val_bpb_memory"] is None and math.isfinite(evaluation["val_bpb_no_memory"])


def test_remote_starts_and_stops_local_server(corpus, tmp_path):
    out = tmp_path / "remote"
    env = {k: v for k, v in os.environ.items() if k != "MEMTRANS_SERVERS"}
    result = run("--data", str(corpus), "--steps", "4", "--out", str(out), *TINY, env=env)
    assert result.returncode == 0, result.stderr
    (endpoint,) = re.findall(r"memory remote on (tcp://\S+)", result.stdout)
    assert all(math.isfinite(r["train_bpb"]) for r in records(out, "train"))
    assert (out / "memory-server-0.log").is_file()
    assert processes_with(endpoint) == []


def default_sigint() -> None:
    """Undo an inherited SIG_IGN for SIGINT, which Python then keeps (no KeyboardInterrupt): a
    shell without job control starts background commands so, e.g. ``.ci/run &``."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_stops_local_server(corpus, tmp_path):
    """Ctrl-C mid-run: exit 130, the auto-started server is gone, the checkpoint is kept."""
    out = tmp_path / "interrupted"
    env = {k: v for k, v in os.environ.items() if k != "MEMTRANS_SERVERS"}
    proc = subprocess.Popen([sys.executable, "-m", "memtrans.train", "--data", str(corpus),
                             "--steps", "10000", "--checkpoint-every", "2", "--eval-every", "0",
                             "--out", str(out), *TINY], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)  # 5 s here; minutes on loaded CI cores
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    (endpoint,) = re.findall(r"memory remote on (tcp://\S+)", stdout)
    assert processes_with(endpoint) == []
    assert (out / "checkpoint.pt").is_file()


def test_missing_corpus(tmp_path):
    assert_clean_error(run("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")),
                       "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_bytes(b"")
    assert_clean_error(run("--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "out")),
                       "no documents")


def test_endpoint_that_never_answers(corpus, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    result = run("--data", str(corpus), "--memory-servers", endpoint, "--memory-timeout", "1",
                 "--steps", "2", "--out", str(tmp_path / "out"), *TINY)
    assert_clean_error(result, endpoint)


def test_bad_setting(corpus, tmp_path):
    result = run("--data", str(corpus), "--memorizing-layers", "5", *TINY[:4])
    assert_clean_error(result, "memorizing_layers")


def test_checkpoint_of_another_config_is_refused_and_kept(inproc_run):
    checkpoint = inproc_run / "checkpoint.pt"
    before = checkpoint.read_bytes()
    log_before = (inproc_run / "log.jsonl").read_text()
    assert_clean_error(run("--resume", str(inproc_run), "--steps", "12", "--dim", "64"),
                       "dim: checkpoint 32, now 64")
    assert checkpoint.read_bytes() == before
    assert (inproc_run / "log.jsonl").read_text() == log_before


def test_fresh_run_does_not_overwrite_a_checkpoint(corpus, inproc_run):
    result = run("--data", str(corpus), "--memory", "inproc", "--steps", "2",
                 "--out", str(inproc_run), *TINY)
    assert_clean_error(result, "already holds a checkpoint")


@pytest.mark.parametrize("key_dtype", ["float32", "float16"])
def test_resume_with_remote_memory_continues_exactly(corpus, tmp_path, key_dtype):
    """Remote flat memory on an auto-started server: 8 steps uninterrupted, and 4 steps then
    --resume to 8 on a new server restored from the checkpoint's snapshot: the same per-step
    losses (the ring of 96 entries wraps by then), with keys stored as --key-dtype says."""
    env = {k: v for k, v in os.environ.items() if k != "MEMTRANS_SERVERS"}
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    common = ("--data", str(corpus), "--eval-every", "4", "--key-dtype", key_dtype, *TINY)
    result = run(*common, "--steps", "8", "--out", str(whole), env=env)
    assert result.returncode == 0, result.stderr
    first = run(*common, "--steps", "4", "--out", str(out), env=env)
    assert first.returncode == 0, first.stderr
    assert len(list((out / "memory").glob("*.snapshot"))) == 1
    second = run("--resume", str(out), "--steps", "8", env=env)
    assert second.returncode == 0, second.stderr
    resumed = [(r["step"], r["train_bpb"]) for r in records(out, "train")]
    assert resumed == [(r["step"], r["train_bpb"]) for r in records(whole, "train")]
    assert figures(out, "eval") == figures(whole, "eval")
    snapshots = list_snapshots(out / "memory")
    assert len(snapshots) == 2  # two slots, used in turn
    state = read_snapshot(out / "memory", snapshots[0].namespace, snapshots[0].tag)
    assert {m["keys"].dtype.name for m in state["memories"]} == {key_dtype}


def test_resume_on_another_server_count_is_refused(corpus, tmp_path):
    out = tmp_path / "remote"
    env = {k: v for k, v in os.environ.items() if k != "MEMTRANS_SERVERS"}
    first = run("--data", str(corpus), "--steps", "1", "--eval-every", "0", "--out", str(out),
                *TINY, env=env)
    assert first.returncode == 0, first.stderr
    assert_clean_error(run("--resume", str(out), "--steps", "2", "--num-servers", "2", env=env),
                       "--num-servers 1")


def descendants_with(root: int, text: str) -> list[int]:
    """Pids of ``root``'s descendants whose command line contains ``text`` (read from /proc)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:  # stat: "pid (comm) state ppid ...", comm may hold spaces
                stat = (proc / "stat").read_text()
                parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found = []
    for pid in processes_with(text):
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, root):
            ancestor = parents.get(ancestor)
        if ancestor == root:
            found.append(pid)
    return found


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def crash_server(pid: int) -> None:
    """SIGKILL a memory server under load: frozen (SIGSTOP) for half a second first, so the
    trainer's requests are in flight when it dies and are lost with it, as in a real crash
    (killed between two requests, a server restarted within --memory-timeout could go unnoticed:
    ZeroMQ delivers the requests queued meanwhile to the new process)."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)


CRASH_STEPS = 40
"""Steps of a crash run (the tiny model does tens per second): the crash lands after the first
checkpoint, at step 2, well before the end."""


def _torchrun_and_kill_server(corpus, out: Path, policy: str) -> subprocess.Popen:
    """A 2-rank torchrun run (gloo) on the server rank 0 starts, checkpointing every 2 steps; once
    the first checkpoint (and so a snapshot) is written, crash the server. Returns torchrun
    (still running); its output goes to ``out``.stdout / .stderr (see ``_finish``)."""
    env = {k: v for k, v in os.environ.items() if k != "MEMTRANS_SERVERS"}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = Path(sys.executable).with_name("torchrun")
    stdout, stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
    with stdout.open("w") as o, stderr.open("w") as e:
        proc = subprocess.Popen(
            [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "memtrans.train",
             "--data", str(corpus), "--steps", str(CRASH_STEPS), "--checkpoint-every", "2",
             "--eval-every", "0", "--memory-timeout", "2", "--memory-wait-timeout", "30",
             "--on-memory-failure", policy, "--out", str(out), *TINY],
            env=env, stdout=o, stderr=e, text=True, start_new_session=True)
    proc.out = out
    try:
        wait_for(lambda: re.search(r"memory remote on (tcp://\S+)", stdout.read_text()), proc,
                 "memory server endpoint")
        (proc.endpoint,) = re.findall(r"memory remote on (tcp://\S+)", stdout.read_text())
        (pid,) = descendants_with(proc.pid, f"--bind\0{proc.endpoint}")
        wait_for((out / "checkpoint.pt").exists, proc, "checkpoint")
        crash_server(pid)
        proc.killed = pid
    except BaseException:
        _finish(proc, timeout=0)
        raise
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 100) -> tuple[str, str]:
    """torchrun's stdout and stderr once it exits; killed (its whole session) after ``timeout``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.out.with_suffix(".stdout").read_text(), proc.out.with_suffix(".stderr").read_text()


def assert_no_trainer_traceback(stderr: str) -> None:
    """No Python traceback from a rank: the only one allowed is torchrun's own report that a
    rank exited non-zero (ChildFailedError)."""
    assert "memtrans/" not in "".join(l for l in stderr.splitlines(True)
                                      if l.lstrip().startswith("File ")), stderr
    assert stderr.count("Traceback") <= stderr.count("ChildFailedError"), stderr


@pytest.mark.slow
def test_two_ranks_server_killed_with_wait_is_restarted_from_snapshot(corpus, tmp_path):
    proc = _torchrun_and_kill_server(corpus, tmp_path / "wait", "wait")
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert "restarting it from snapshot ckpt-" in stderr
    assert "memory server failure" in stderr and "policy wait" in stderr, stderr
    assert proc.endpoint in stderr
    assert all(f["policy"] == "wait" for f in records(proc.out, "memory_failure"))
    train = records(proc.out, "train")
    assert [r["step"] for r in train] == list(range(1, CRASH_STEPS + 1))
    assert all(math.isfinite(r["train_bpb"]) for r in train)
    assert train[-1]["memory_skipped"] == 0
    assert [r["step"] for r in records(proc.out, "eval")] == [CRASH_STEPS]
    assert_no_trainer_traceback(stderr)
    assert processes_with(proc.endpoint) == []


@pytest.mark.slow
def test_two_ranks_server_killed_with_skip_finishes_and_counts_skipped_steps(corpus, tmp_path):
    proc = _torchrun_and_kill_server(corpus, tmp_path / "skip", "skip")
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    train = records(proc.out, "train")
    assert [r["step"] for r in train] == list(range(1, CRASH_STEPS + 1))
    # What failed with the server (a segment on either rank, the validation namespace the
    # restart lost) ran without memory: counted over both ranks, and logged.
    assert train[-1]["memory_skipped"] >= 1, stderr
    assert "policy skip" in stderr
    assert all(f["policy"] == "skip" for f in records(proc.out, "memory_failure"))
    assert_no_trainer_traceback(stderr)
    assert processes_with(proc.endpoint) == []


@pytest.mark.slow
def test_two_ranks_server_killed_with_stop_exits_naming_the_endpoint(corpus, tmp_path):
    proc = _torchrun_and_kill_server(corpus, tmp_path / "stop", "stop")
    stdout, stderr = _finish(proc)
    assert proc.returncode != 0, stderr
    messages = [l for l in stderr.splitlines() if l.startswith("memtrans-train: error: ")]
    assert messages, stderr
    assert any(proc.endpoint in m and "--on-memory-failure" in m for m in messages), stderr
    assert_no_trainer_traceback(stderr)
    assert (proc.out / "checkpoint.pt").is_file()
    assert processes_with(proc.endpoint) == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_two_ranks_two_servers(corpus, tmp_path, memory_server):
    """2 ranks (gloo) on 2 memory servers: both ranks' global rows reach the servers."""
    servers = [s.endpoint for s in memory_server(2)]
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "memtrans.train",
         "--data", str(corpus), "--memory-servers", ",".join(servers), "--steps", "12",
         "--eval-every", "6", "--out", str(out), *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows: set[int] = set()
    with MemoryClient(servers, timeout=5) as client:
        while proc.poll() is None:
            for stats in client.stats():
                for namespace in stats["per_namespace"].values():
                    rows.update(namespace["rows"])
            time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "run without --data-dir" in stdout + stderr  # the checkpoint cannot hold memories
    assert rows == {0, 1, 2, 3}  # rank 0: rows 0, 1; rank 1: rows 2, 3
    assert all(math.isfinite(r["train_bpb"]) for r in records(out, "train"))
    assert [r["step"] for r in records(out, "eval")] == [6, 12]
    assert (out / "checkpoint.pt").is_file()


def test_generate_reads_priming_document_then_samples(inproc_run, corpus):
    prime = sorted(corpus.iterdir())[0]
    result = subprocess.run([sys.executable, "-m", "memtrans.generate", "--checkpoint",
                             str(inproc_run), "--prime", str(prime), "--length", "20"],
                            capture_output=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert 0 < len(result.stdout) <= 21


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_launch_local_script(corpus, tmp_path):
    """launch/local.sh: 2 servers, 2 ranks, a few steps; the servers are gone afterwards."""
    base = free_port()
    while not all(_port_free(base + i) for i in range(2)):
        base = free_port()
    script = Path(__file__).resolve().parents[1] / "launch" / "local.sh"
    env = {**os.environ, "NPROC": "2", "NSERVERS": "2", "BASE_PORT": str(base),
           "PYTHON": sys.executable, "LOG_DIR": str(tmp_path)}
    out = tmp_path / "run"
    result = subprocess.run(["bash", str(script), "--data", str(corpus), "--steps", "3",
                             "--eval-every", "0", "--out", str(out), *TINY],
                            env=env, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr
    assert all(math.isfinite(r["train_bpb"]) for r in records(out, "train"))
    for i in range(2):
        assert processes_with(f"tcp://127.0.0.1:{base + i}") == []


@pytest.mark.slow
def test_launch_local_supervisor_restarts_a_killed_server(corpus, tmp_path):
    """launch/local.sh, 1 rank on 1 server with --on-memory-failure wait: the server crashes
    after the first checkpoint; the script's supervisor restarts it from the newest snapshot in
    DATA_DIR and the run finishes."""
    base = free_port()
    endpoint = f"tcp://127.0.0.1:{base}"
    script = Path(__file__).resolve().parents[1] / "launch" / "local.sh"
    env = {**os.environ, "NPROC": "1", "NSERVERS": "1", "BASE_PORT": str(base),
           "PYTHON": sys.executable, "LOG_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    with (tmp_path / "stdout").open("w") as o, (tmp_path / "stderr").open("w") as e:
        proc = subprocess.Popen(
            ["bash", str(script), "--data", str(corpus), "--steps", str(CRASH_STEPS),
             "--checkpoint-every", "2", "--eval-every", "0", "--memory-timeout", "2",
             "--memory-wait-timeout", "30", "--on-memory-failure", "wait", "--out", str(out),
             *TINY], env=env, stdout=o, stderr=e, start_new_session=True)
    try:
        server = f"--bind\0{endpoint}"  # the server's command line, not the script's ping
        wait_for(lambda: descendants_with(proc.pid, server), proc, "memory server")
        (pid,) = descendants_with(proc.pid, server)
        wait_for((out / "checkpoint.pt").exists, proc, "checkpoint")
        crash_server(pid)
        assert list((tmp_path / "memory-data").glob("*@ckpt-*.shard-0-of-1.snapshot"))
        proc.wait(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr
    # The snapshot of tenant "local", the script's token.
    assert f"memory server {endpoint} exited; restarting it from snapshot local.memtrans-" \
        in stderr
    assert "policy wait" in stderr
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, CRASH_STEPS + 1))
    assert train[-1]["memory_skipped"] == 0
    assert processes_with(endpoint) == []


def _port_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    from memtrans.config import TrainConfig
    from memtrans.train import learning_rate

    config = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, lr_schedule="cosine")
    rates = [learning_rate(step, config) for step in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10] == pytest.approx(1e-3) and rates[60] == pytest.approx(0.55e-3)
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))
    assert learning_rate(110, config) == pytest.approx(1e-4)
    assert learning_rate(10**6, config) == pytest.approx(1e-4)  # extended by --resume: held
    constant = TrainConfig(steps=110, warmup_steps=10, lr=1e-3)
    assert {learning_rate(step, constant) for step in range(10, 200)} == {1e-3}


def test_collectives_outwait_a_memory_server_wait():
    from datetime import timedelta

    from memtrans.config import TrainConfig
    from memtrans.train import collective_timeout

    assert collective_timeout(TrainConfig()) == timedelta(minutes=30)  # torch's default
    long_wait = TrainConfig(on_memory_failure="wait", memory_wait_timeout=7200.0)
    assert collective_timeout(long_wait) > timedelta(seconds=7200)


def test_weight_decay_applies_to_linear_weights_only():
    """The kNN temperature (shape heads x 1 x 1), gates, embeddings and position biases are not
    decayed: decay shrank the temperature from 20 towards 13 over a cosine run."""
    from memtrans.build import build_model
    from memtrans.config import TrainConfig
    from memtrans.train import _optimizer

    config = TrainConfig(knn_combine="gate")
    model = build_model(config)
    decayed, plain = _optimizer(model, config).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert decayed["weight_decay"] == config.weight_decay and plain["weight_decay"] == 0
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert decayed_names == linear
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {"layers.0.0.fn.scale", "layers.0.0.fn.combine_gate", "token_emb.weight",
            "rel_pos_bias.relative_attention_bias.weight"} <= plain_names


@pytest.mark.parametrize("depth", [1, 2, 4, 12])
def test_the_default_memorizing_layer_is_the_first_at_any_depth(depth):
    from memtrans.config import TrainConfig

    assert TrainConfig(depth=depth).memorizing_layers == (1,)


def test_a_model_without_memorizing_layers_needs_memory_off():
    from memtrans.config import TrainConfig

    assert TrainConfig(memorizing_layers=(), memory="off").memorizing_layers == ()
    with pytest.raises(ValueError, match="no kNN memory: use --memory off"):
        TrainConfig(memorizing_layers=())


RECALL = ["--data", "recall", "--recall-bindings", "40", "--recall-distance", "256",
          "--seq-len", "64", "--xl-max-memories", "192", "--dim", "32", "--depth", "2",
          "--heads", "2", "--dim-head", "16", "--batch-size", "2", "--max-memories", "512",
          "--num-retrieved", "8", "--eval-batches", "12", "--log-every", "1", "--steps", "2",
          "--eval-every", "2"]


@pytest.mark.parametrize("extra", [["--memory", "inproc", "--knn-combine", "gate"],
                                   ["--memory", "off", "--memorizing-layers", ""]])
def test_recall_run_reports_answers_by_kind_hit_rate_and_gates(tmp_path, extra):
    """--data recall at depth 2 with no --memorizing-layers (the default: layer 1)."""
    out = tmp_path / "recall"
    result = run("--out", str(out), *RECALL, *extra)
    assert result.returncode == 0, result.stderr
    assert "recall task: 40 bindings per document" in result.stdout
    (record,) = records(out, "eval")
    off = record["recall_no_memory"]
    assert off["in_context_tokens"] > 0 and off["memory_only_tokens"] > 0
    assert 0 <= off["memory_only_accuracy"] <= 1 and off["memory_only_bits"] > 0
    if "gate" in extra:
        on = record["recall_memory"]
        assert on["in_context_tokens"] == off["in_context_tokens"]
        assert 0 <= on["hit_rate_layer1"] <= 1 and off["hit_rate_layer1"] == 0
        (layer,) = record["knn_layers"].values()
        assert len(layer["temperature"]) == 2 and all(0 < g < 1 for g in layer["gate"])
    else:
        assert record["recall_memory"] is None and "knn_layers" not in record
        assert "hit_rate_layer1" not in off


def test_recall_distance_inside_the_window_is_refused(tmp_path):
    result = run("--out", str(tmp_path / "r"), *RECALL, "--memory", "inproc",
                 "--recall-distance", "100")
    assert_clean_error(result, "inside the model's local + XL window", "--recall-distance >= 256")


def test_recall_in_context_fraction_reaches_the_task_and_is_range_checked(tmp_path):
    from memtrans.build import open_corpus
    from memtrans.config import TrainConfig

    corpus = open_corpus(TrainConfig(data="recall", recall_in_context_fraction=1.0,
                                     recall_bindings=40, recall_distance=512))
    answers = corpus.val[0].answers()
    assert corpus.task.in_context_fraction == 1.0
    assert len(answers.kinds) > 0 and (answers.kinds == 0).all()
    result = run("--out", str(tmp_path / "r"), *RECALL, "--memory", "inproc",
                 "--recall-in-context-fraction", "1.5")
    assert_clean_error(result, "recall_in_context_fraction", "in [0, 1]")


def test_key_mixing_flags_reach_the_model_and_old_checkpoints_resume_without():
    from dataclasses import asdict

    from memtrans.build import build_model
    from memtrans.checkpoint import resolve_config
    from memtrans.config import TrainConfig, build_parser

    def count(config, part):
        return sum(part in n for n, _ in build_model(config).named_parameters())

    default = TrainConfig()
    assert not default.smear_keys and count(default, "key_smear") == 0
    assert default.qk_conv == 8 and count(default, "_conv") == 2  # on the one kNN layer
    flags = vars(build_parser().parse_args(["--smear-keys", "--qk-conv", "0"]))
    assert flags == {"smear_keys": True, "qk_conv": 0}
    assert count(TrainConfig(**flags), "key_smear") == default.depth
    assert count(TrainConfig(**flags), "_conv") == 0
    saved = asdict(TrainConfig(out="old"))
    del saved["smear_keys"], saved["qk_conv"], saved["qk_conv_layers"]  # from before the flags
    del saved["copy_warmup_steps"]
    resumed = resolve_config({}, {"config": saved}, Path("old/checkpoint.pt"))
    assert resumed.smear_keys is False and resumed.qk_conv == 0
    assert resumed.copy_warmup_steps == 0
    layered = vars(build_parser().parse_args(["--qk-conv-layers", "1,2"]))
    assert count(TrainConfig(**layered), "_conv") == 4
    saved = asdict(TrainConfig(out="old", **layered))
    saved["qk_conv_layers"] = list(saved["qk_conv_layers"])  # as a checkpoint stores it
    assert resolve_config({}, {"config": saved}, Path("old/c.pt")).qk_conv_layers == (1, 2)
    with pytest.raises(ValueError, match="smear_keys must be True or False"):
        TrainConfig(smear_keys="yes")
    with pytest.raises(ValueError, match=r"qk_conv must be an integer in \[0, 16\]"):
        TrainConfig(qk_conv=17)
    with pytest.raises(ValueError, match=r"qk_conv_layers must be 1-based layer numbers in \[1,"):
        TrainConfig(qk_conv_layers=(5,))


def test_documents_flags_and_old_checkpoints_read_uncut_files():
    from dataclasses import asdict

    from memtrans.checkpoint import resolve_config
    from memtrans.config import TrainConfig, build_parser

    default = TrainConfig()
    assert (default.documents, default.max_document_bytes) == ("package", 256 * 1024)
    flags = vars(build_parser().parse_args(["--documents", "file", "--max-document-bytes", "0"]))
    assert flags == {"documents": "file", "max_document_bytes": 0}
    saved = asdict(TrainConfig(out="old"))
    del saved["documents"], saved["max_document_bytes"]  # from before package documents
    resumed = resolve_config({}, {"config": saved}, Path("old/checkpoint.pt"))
    assert (resumed.documents, resumed.max_document_bytes) == ("file", 0)
    with pytest.raises(ValueError, match="documents must be one of"):
        TrainConfig(documents="repo")
    with pytest.raises(ValueError, match="max_document_bytes must be a non-negative integer"):
        TrainConfig(max_document_bytes=-1)


def test_repeated_documents_reach_the_stream_and_resume_exactly(tmp_path):
    """--repeat-spans 1 --repeat-span 0 on documents of 2-3 segments: every one read twice (half
    as many started as without), and 4 steps then --resume to 8 give the uninterrupted run's
    losses, also when stopped inside a second read; checkpoints from before it read each once.
    The default span is the kNN memory rounded down to segments."""
    from dataclasses import asdict

    from memtrans.checkpoint import resolve_config
    from memtrans.config import TrainConfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 5)
    common = ("--data", str(corpus), "--memory", "inproc", "--eval-every", "0", *TINY)
    outs = {name: tmp_path / name for name in ("once", "whole", "resumed")}
    results = [run(*common, "--steps", "8", "--out", str(outs["once"])),
               run(*common, "--steps", "8", "--repeat-spans", "1", "--repeat-span", "0",
                   "--out", str(outs["whole"])),
               run(*common, "--steps", "4", "--repeat-spans", "1", "--repeat-span", "0",
                   "--out", str(outs["resumed"])),
               run("--resume", str(outs["resumed"]), "--steps", "8")]
    for result in results:
        assert result.returncode == 0, result.stderr
    started = {name: records(out, "train")[-1]["coverage"]["documents_started"]
               for name, out in outs.items()}
    assert started["whole"] == started["resumed"] < started["once"]
    assert [(r["step"], r["train_bpb"]) for r in records(outs["resumed"], "train")] == \
        [(r["step"], r["train_bpb"]) for r in records(outs["whole"], "train")]
    saved = asdict(TrainConfig(out="old"))
    del saved["repeat_spans"], saved["repeat_span"]
    assert resolve_config({}, {"config": saved}, Path("old/checkpoint.pt")).repeat_spans == 0
    with pytest.raises(ValueError, match="repeat_spans must be in"):
        TrainConfig(repeat_spans=2)
    with pytest.raises(ValueError, match="repeat_span must be a multiple of seq_len=256"):
        TrainConfig(repeat_span=1000)
    assert TrainConfig(max_memories=5000, seq_len=512).repeat_span_tokens == 4608
    assert TrainConfig(max_memories=96, seq_len=512).repeat_span_tokens == 512


def test_copy_warmup_trains_on_the_copy_task_first_and_resumes_exactly(corpus, tmp_path):
    """--copy-warmup-steps 3 of 6: steps 1-3 on copy batches, then the corpus; stopped at step 2
    and resumed, the same per-step losses (the warm-up batches are a function of the step)."""
    flags = ["--data", str(corpus), "--memory", "inproc", "--copy-warmup-steps", "3",
             "--eval-every", "6", *TINY]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run(*flags, "--steps", "6", "--out", str(whole)).returncode == 0
    first = run(*flags, "--steps", "2", "--out", str(split))
    assert first.returncode == 0, first.stderr
    second = run("--resume", str(split), "--steps", "6")
    assert second.returncode == 0, second.stderr
    train = records(whole, "train")
    assert [r["data"] for r in train] == ["copy"] * 3 + ["corpus"] * 3
    assert [(r["step"], r["train_bpb"]) for r in records(split, "train")] == \
        [(r["step"], r["train_bpb"]) for r in train]


def test_init_from_starts_a_memory_model_from_a_model_without_memory(corpus, tmp_path):
    """Fine-tuning with memory: a model trained with --memory off (its kNN layer attends
    locally only) starts a memory run with the paper's gate; the weights both have come from
    the checkpoint, the gate (new) is initialised; optimizer and step start fresh."""
    from memtrans.build import build_model
    from memtrans.checkpoint import load_checkpoint, load_weights
    from memtrans.config import TrainConfig

    base = tmp_path / "base"
    result = run("--data", str(corpus), "--steps", "2", "--out", str(base), "--memory", "off",
                 *TINY)
    assert result.returncode == 0, result.stderr
    tuned = tmp_path / "tuned"
    result = run("--data", str(corpus), "--steps", "1", "--memory", "inproc", "--knn-combine",
                 "gate", "--init-from", str(base), "--out", str(tuned), *TINY)
    assert result.returncode == 0, result.stderr
    [init] = records(tuned, "init")
    assert init == {"kind": "init", "init_from": str(base),
                    "new_parameters": ["layers.1.0.fn.combine_gate"]}
    assert "initialised here: layers.1.0.fn.combine_gate" in result.stdout
    _, state = load_checkpoint(str(tuned))
    assert state["step"] == 1 and state["config"]["init_from"] == str(base)

    # In process: exactly the shared weights are loaded, the rest keeps its initialisation.
    weights = load_checkpoint(str(base))[1]["model"]
    model = build_model(TrainConfig(dim=32, depth=2, heads=2, dim_head=16,
                                    memorizing_layers=(2,), num_retrieved=8, max_memories=96,
                                    xl_max_memories=64, knn_combine="gate"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_weights(model, weights, "base") == ["layers.1.0.fn.combine_gate"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh[name] if name not in weights else weights[name]), name


def test_init_from_refuses_weights_that_do_not_fit(corpus, inproc_run, tmp_path):
    result = run("--data", str(corpus), "--steps", "1", "--memory", "inproc",
                 "--init-from", str(inproc_run), "--out", str(tmp_path / "wide"), *TINY,
                 "--dim", "48")
    assert_clean_error(result, "--init-from", "token_emb.weight: checkpoint (259, 32), this "
                       "model (259, 48)", "start from a run of the same --dim")
    plain = tmp_path / "plain"  # layer 2 plain attention: its to_out has a bias, a kNN layer's not
    result = run("--data", str(corpus), "--steps", "1", "--out", str(plain), *TINY,
                 "--memorizing-layers", "", "--memory", "off")
    assert result.returncode == 0, result.stderr
    result = run("--data", str(corpus), "--steps", "1", "--memory", "inproc",
                 "--init-from", str(plain), "--out", str(tmp_path / "x"), *TINY)
    assert_clean_error(result, "layers.1.0.fn.to_out.bias: not in this model", "--memory off")
    result = run("--data", str(corpus), "--steps", "1", "--init-from", str(tmp_path / "none"),
                 "--out", str(tmp_path / "y"), *TINY)
    assert_clean_error(result, "no checkpoint at")
