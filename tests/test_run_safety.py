"""One run per save directory, and no rank outlives its launcher: a second run on a directory in use is
refused naming the holder (launcher or torchrun rank 0); the lock of a dead run is taken over; SIGKILL of the
launcher takes its workers and their children with it; SIGHUP stops the run like SIGTERM; a signal during
start-up (building the model, loading a checkpoint, building the data order) ends in exit 75 too."""
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import REPO, cpu_env, read_metrics, run_medmoe, start_medmoe, train_stage, wait_for_step
from megatron_medmoe.runtime.exit_codes import EXIT_CONFIG, EXIT_REQUEUE
from megatron_medmoe.training.run_lock import LOCK_NAME, RunLockError, lock_directories

FAULTS = str(REPO / "tests" / "faults")
METRICS = lambda root: root / "out" / "cpt" / "metrics.jsonl"  # noqa: E731


def args(root, *extra, steps=200):
    return train_stage("cpt", f"training.train_steps={steps}", "logging.log_interval=1",
                       f"checkpoint.save={root / 'ckpt'}", f"logging.output_dir={root / 'out'}", *extra)


HOLD = "import sys, time; from megatron_medmoe.training.run_lock import lock_directories; " \
       "lock_directories(sys.argv[1:]); print('held', flush=True); time.sleep(600)"


def holder(*directories, **env):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, directories)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=cpu_env(**env))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"{tmp_path} is in use by another run: pid {proc.pid} on "
                                               rf"{socket.gethostname()}, started 20\d\d-"):
            lock_directories([tmp_path])
    finally:
        proc.kill()
        proc.wait()
    lock = lock_directories([tmp_path, tmp_path / "."])  # the same directory twice is locked once
    assert len(lock.fds) == 1
    assert f"took over the lock left by a run that ended without releasing it, {tmp_path}: pid {proc.pid}" \
        in lock.report()[0]
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean end names no holder
    lock_directories([tmp_path]).release()


def test_a_requeued_slurm_job_waits_for_its_earlier_incarnation(tmp_path, monkeypatch):
    """Slurm keeps the job id across a requeue; a file server may release the old incarnation's lock late."""
    proc = holder(tmp_path, SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    threading.Timer(1.0, proc.kill).start()  # the old incarnation goes a second later
    started = time.monotonic()
    lock = lock_directories([tmp_path])
    assert time.monotonic() - started >= 1.0 and f"pid {proc.pid}" in lock.report()[0]
    lock.release()
    proc.wait()
    other = holder(tmp_path, SLURM_JOB_ID="78")  # another job is refused at once
    try:
        with pytest.raises(RunLockError, match=f"pid {other.pid}"):
            lock_directories([tmp_path])
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("launcher", ["medmoe", "torchrun rank 0"])
def test_a_second_run_on_a_directory_in_use_is_refused_before_it_writes(tmp_path, launcher):
    out = tmp_path / "out"
    proc = holder(out / "cpt")  # the output directory is in use (another run's, say)
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"} \
        if launcher != "medmoe" else {}
    try:
        refused = run_medmoe(args(tmp_path, "parallel.expert=1", "moe.expert_slots=null") if env else args(tmp_path),
                             check=False, timeout=120, **env)
    finally:
        proc.kill()
        proc.wait()
    assert refused.returncode == EXIT_CONFIG, refused.stderr[-2000:]
    assert f"{out / 'cpt'} is in use by another run: pid {proc.pid}" in refused.stderr
    assert "Traceback" not in refused.stderr and not (out / "cpt" / "run_config.yaml").exists()


def family(proc):
    """The launcher's workers and everything they started."""
    return psutil.Process(proc.pid).children(recursive=True)


@pytest.mark.multiprocess
def test_workers_die_with_a_killed_launcher_and_the_directory_is_free_again(tmp_path):
    nohup = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # noqa: E731
    first = start_medmoe(args(tmp_path, "checkpoint.save_interval=1"), preexec_fn=nohup)
    wait_for_step(first, METRICS(tmp_path), 2)  # past a save: the checkpoint writers are running too
    workers = family(first)
    assert len(workers) >= 2
    first.send_signal(signal.SIGHUP)  # ignored, as nohup asked
    wait_for_step(first, METRICS(tmp_path), 4)
    second = run_medmoe(args(tmp_path), check=False, timeout=120)  # the same command again, meanwhile
    assert second.returncode == EXIT_CONFIG and f"pid {first.pid} on" in second.stderr

    first.kill()  # SIGKILL: nothing of the launcher runs any more
    first.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    lock = lock_directories([tmp_path / "ckpt" / "cpt", tmp_path / "out" / "cpt"])
    assert any(f"pid {first.pid}" in line for line in lock.report())
    lock.release()


@pytest.mark.multiprocess
def test_sighup_then_signals_during_start_up_all_end_in_exit_75(tmp_path):
    run = start_medmoe(args(tmp_path))
    wait_for_step(run, METRICS(tmp_path), 2)
    run.send_signal(signal.SIGHUP)  # the terminal closed
    out, err = run.communicate(timeout=300)
    assert run.returncode == EXIT_REQUEUE, err[-3000:]
    stopped = max(r["step"] for r in read_metrics(tmp_path / "out", "cpt"))
    assert f"stopping after step {stopped} on a stop signal: saved" in out
    latest = tmp_path / "ckpt" / "cpt" / "latest_checkpointed_iteration.txt"

    for phase in ("load", "data"):  # a SIGTERM on rank 1 while it loads the checkpoint / builds the data order
        proc = run_medmoe(args(tmp_path), check=False, PYTHONPATH=FAULTS, MEDMOE_FAULT=f"signal_at:1:{phase}")
        assert proc.returncode == EXIT_REQUEUE, proc.stderr[-3000:]
        assert f"stopping before step {stopped + 1}: a stop signal arrived during start-up; nothing new to save" \
            in proc.stdout
        assert latest.read_text().strip() == str(stopped) and "Traceback" not in proc.stderr
    fresh = tmp_path / "fresh"
    proc = run_medmoe(args(fresh), check=False, PYTHONPATH=FAULTS, MEDMOE_FAULT="signal_at:0:model")
    assert proc.returncode == EXIT_REQUEUE and "stopping before step 1" in proc.stdout, proc.stderr[-3000:]
