"""Launching on a real Slurm (two virtual nodes on this machine, tests/slurm/cluster_up.sh), under mpirun, and
`medmoe submit`'s checks and dry run. Preempted jobs must requeue and end bitwise where an uninterrupted
run ends."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, cpu_env, read_metrics, run_medmoe, train_stage

SLURM_DIR = Path(os.environ.get("MEDMOE_TEST_SLURM_DIR", "/tmp/medmoe-test-slurm"))
VENV_BIN = str(Path(sys.executable).parent)
STEPS = 24  # long enough to be interrupted after step 3, short enough for CI


def run_args(out: Path):
    return [f"training.train_steps={STEPS}", "logging.log_interval=1", f"checkpoint.save={out / 'ck'}",
            f"logging.output_dir={out / 'run'}"]


def stage_args(out: Path):
    return ["--stage", "cpt", *run_args(out)]


def job_env(**extra):
    env = cpu_env(GLOO_SOCKET_IFNAME="lo", PATH=f"{VENV_BIN}:{os.environ['PATH']}", **extra)
    env.pop("SLURM_CONF", None)
    return env


@pytest.fixture(scope="module")
def cluster():
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")) and os.geteuid() == 0
    if not have:
        message = ("needs root and a local Slurm: Debian's slurmctld slurmd slurm-client munge libpmix2 "
                   "(`make test` installs them as root)")
        if os.environ.get("MEDMOE_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    env = job_env(SLURM_CI_DIR=str(SLURM_DIR))
    subprocess.run(["bash", str(REPO / "tests/slurm/cluster_down.sh")], env=env, capture_output=True)
    up = subprocess.run(["bash", str(REPO / "tests/slurm/cluster_up.sh")], env=env, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    yield env
    subprocess.run(["bash", str(REPO / "tests/slurm/cluster_down.sh")], env=env, capture_output=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every launcher must reproduce: `medmoe train` starting its own 2 workers."""
    out = tmp_path_factory.mktemp("reference")
    run_medmoe(["train", TINY, *stage_args(out)])
    records = read_metrics(out / "run", "cpt")
    assert records[-1]["step"] == STEPS
    return records[-1]["loss"]


def slurm(env, *args, check=True) -> str:
    proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def job_fields(env, job: str) -> dict:
    return dict(re.findall(r"\b(\w+)=(\S*)", slurm(env, "scontrol", "show", "job", job)))


def job_field(env, job: str, name: str) -> str:
    return job_fields(env, job).get(name, "")


def wait_for_step(metrics: Path, step: int, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if lines and lines[-1]["step"] >= step:
                return lines[-1]["step"]
        time.sleep(0.2)
    raise AssertionError(f"{metrics} never reached step {step}")


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_until_done(env, job: str, timeout=300) -> str:
    """The job's final state. A requeued job passes through transient states, so a final state must hold for
    3 s. (A requeued job starts again once its old credential expired: cluster_up.sh sets 10 s.)"""
    deadline, seen, final_since = time.monotonic() + timeout, [], None
    while time.monotonic() < deadline:
        fields = job_fields(env, job)
        state, reason = fields.get("JobState", ""), fields.get("Reason", "")
        if not seen or seen[-1] != (state, reason):
            seen.append((state, reason))
        if state in FINAL:
            final_since = final_since or time.monotonic()
            if time.monotonic() - final_since > 3:
                return state
        else:
            final_since = None
        time.sleep(0.5)
    raise AssertionError(f"job {job} not done after {timeout} s: {seen}")


def interrupt(env, job: str, metrics: Path) -> int:
    """`scancel --signal=TERM` once the job has trained a few steps (preemption's signal, to every rank)."""
    step = wait_for_step(metrics, 3)
    slurm(env, "scancel", "--signal=TERM", job)
    return step


def test_sbatch_template_on_two_nodes_is_preempted_requeued_and_ends_bitwise_as_uninterrupted(
        cluster, reference, tmp_path):
    job = slurm(cluster, "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%x-%j.out", f"--chdir={REPO}",
                str(REPO / "slurm" / "train.sbatch"), TINY, *stage_args(tmp_path)).strip()
    interrupt(cluster, job, tmp_path / "run" / "cpt" / "metrics.jsonl")
    assert wait_until_done(cluster, job) == "COMPLETED"
    assert job_field(cluster, job, "Restarts") == "1"
    log = (tmp_path / f"medmoe-train-{job}.out").read_text()
    assert "2 node(s) n[1-2]" in log and "requeueing job" in log and "resuming from" in log, log[-3000:]
    assert "training steps 1-24 on 2 ranks" in log
    records = read_metrics(tmp_path / "run", "cpt")
    assert records[-1]["step"] == STEPS and records[-1]["loss"] == reference


def test_submit_chains_two_stages_and_requeues_a_preempted_stage(cluster, reference, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_medmoe", "submit", TINY, "--nodes", "2",
                           "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--folder",
                           str(tmp_path / "logs"), *run_args(tmp_path)],
                          cwd=REPO, env=cluster, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(re.findall(r"^stage (\w+): job (\d+)", proc.stdout, re.M))
    assert set(jobs) == {"cpt", "sft"}, proc.stdout
    assert job_field(cluster, jobs["sft"], "Dependency").startswith(f"afterok:{jobs['cpt']}")
    interrupt(cluster, jobs["cpt"], tmp_path / "run" / "cpt" / "metrics.jsonl")
    assert wait_until_done(cluster, jobs["cpt"]) == "COMPLETED"
    assert job_field(cluster, jobs["cpt"], "Restarts") == "1"
    assert read_metrics(tmp_path / "run", "cpt")[-1]["loss"] == reference
    assert wait_until_done(cluster, jobs["sft"]) == "COMPLETED"
    assert job_field(cluster, jobs["sft"], "StartTime") >= job_field(cluster, jobs["cpt"], "EndTime")
    cpt_log = (tmp_path / "logs" / jobs["cpt"] / f"{jobs['cpt']}_0_log.out").read_text()
    assert "requeueing job" in cpt_log and f"resuming from {tmp_path / 'ck' / 'cpt'} at step" in cpt_log
    sft_log = (tmp_path / "logs" / jobs["sft"] / f"{jobs['sft']}_0_log.out").read_text()
    assert f"initialized the model weights from {tmp_path / 'ck' / 'cpt'} (saved at step {STEPS})" in sft_log
    assert read_metrics(tmp_path / "run", "sft")[-1]["step"] == STEPS


def need_mpirun():
    if not shutil.which("mpirun"):
        message = "needs Open MPI (Debian's openmpi-bin; `make test` installs it as root)"
        if os.environ.get("MEDMOE_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def test_mpirun_two_ranks(reference, tmp_path):
    need_mpirun()
    env = cpu_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PATH=f"{VENV_BIN}:{os.environ['PATH']}",
                  MASTER_PORT=str(29400 + os.getpid() % 500))
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "medmoe", "train", TINY, *stage_args(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 ranks" in proc.stdout
    assert read_metrics(tmp_path / "run", "cpt")[-1]["loss"] == reference


def test_mpi4py_gives_every_rank_the_same_rendezvous():
    need_mpirun()
    code = ("import json; from megatron_medmoe.runtime.env import mpi4py_env; e = mpi4py_env(None); "
            "print(json.dumps([e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port]))")
    env = cpu_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = sorted(json.loads(found) for found in re.findall(r"\[[^\]]*\]", proc.stdout))  # lines may interleave
    assert [s[:3] for s in seen] == [[0, 2, 0], [1, 2, 1]]
    assert seen[0][3:] == seen[1][3:] and seen[0][3] == "127.0.0.1"


def submit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "megatron_medmoe", "submit", *args], cwd=REPO,
                          env=env or job_env(), capture_output=True, text=True, timeout=120)


def test_dry_run_for_sixteen_nodes_field_by_field(tmp_path):
    folder = tmp_path / "logs"
    proc = submit("examples/medical-instruct.yaml", "training.global_batch_size=512", "--nodes", "16",
                  "--gpus-per-node", "8", "--cpus-per-task", "12", "--time", "2-00:00:00", "--partition", "gpu",
                  "--account", "medai", "--qos", "high", "--constraint", "h100", "--mail-user", "ops@example.org",
                  "--mail-type", "END,FAIL", "--container-image", "nvcr.io#nvidia/pytorch:25.04-py3",
                  "--container-mounts", "/lustre:/lustre", "--signal-seconds", "600", "--folder", str(folder),
                  "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not folder.exists()  # nothing written, nothing submitted
    scripts = re.split(r"^# stage (\w+): .*$", proc.stdout, flags=re.M)[1:]
    stages = dict(zip(scripts[::2], scripts[1::2]))
    assert list(stages) == ["general", "mcq"]
    for stage, script in stages.items():
        flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.M))
        expected = {"job-name": f"medmoe-medical-instruct-{stage}", "nodes": "16", "ntasks-per-node": "8",
                    "gpus-per-node": "8", "cpus-per-task": "12", "time": "2880", "partition": "gpu",
                    "account": "medai", "qos": "high", "constraint": "h100", "mail-user": "ops@example.org",
                    "mail-type": "END,FAIL", "signal": "USR1@600", "requeue": "", "open-mode": "append",
                    "output": f"{folder}/%j/%j_0_log.out"}
        for key, value in expected.items():
            assert flags.get(key) == value, (stage, key, flags.get(key))
        assert ("dependency" in flags) == (stage == "mcq")
        srun = next(line for line in script.splitlines() if line.startswith("srun "))
        assert "'--container-image=nvcr.io#nvidia/pytorch:25.04-py3'" in srun
        assert "--container-mounts=/lustre:/lustre" in srun
        assert srun.endswith(f"python -u -m submitit.core._submit {folder}/%j")
    assert dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", stages["mcq"], re.M))["dependency"] == "afterok:JOBID_GENERAL"


@pytest.mark.parametrize("args, says", [
    (["--nodes", "1", "--gpus-per-node", "3"], "--nodes 1 x 3 tasks per node = 3 ranks"),
    (["--nodes", "2", "--gpus-per-node", "0", "--partition", "nosuch"], "--partition nosuch: this cluster has no "
                                                                         "such partition (it has: debug)"),
    (["--nodes", "2", "--gpus-per-node", "0", "--container-image", "/nonexistent/medmoe.sqsh"],
     "--container-image /nonexistent/medmoe.sqsh: no such file"),
    (["--nodes", "2", "--gpus-per-node", "0", "--stage", "pretrain"], "--stage pretrain: the recipe's stages are"),
])
def test_submit_refuses_what_cannot_work_and_submits_nothing(cluster, tmp_path, args, says):
    before = slurm(cluster, "squeue", "-h", "-o", "%i")
    proc = submit(TINY, "--folder", str(tmp_path / "logs"), *args, env=cluster)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nothing submitted" in proc.stderr and says in proc.stderr, proc.stderr
    assert not (tmp_path / "logs").exists()
    assert slurm(cluster, "squeue", "-h", "-o", "%i") == before


def test_site_rules_from_the_clusters_own_answers():
    from megatron_medmoe.launch.site import Site, accounts_enforced, check_site, parse_partitions

    parts = parse_partitions("PartitionName=gpu AllowGroups=ALL Default=NO\nPartitionName=cpu Default=NO\n")
    assert parts == {"gpu": False, "cpu": False}
    assert accounts_enforced("AccountingStorageEnforce = associations,limits\n")
    assert not accounts_enforced("AccountingStorageEnforce = none\n")
    strict = Site(["cpu", "gpu"], None, True, None)
    assert check_site(strict, None, None) == [
        "--partition is required here: this cluster has no default partition (it has: cpu, gpu)",
        "--account is required here: the cluster enforces accounts (AccountingStorageEnforce) and you have no "
        "default account"]
    assert check_site(strict, "gpu", "medai") == []
    assert check_site(Site(["debug"], "debug", True, "lab"), None, None) == []


def test_submit_with_the_local_executor_runs_the_stages_in_order(tmp_path):
    proc = submit(TINY, "--executor", "local", "--folder", str(tmp_path / "logs"), "training.train_steps=2",
                  f"checkpoint.save={tmp_path / 'ck'}", f"logging.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    result = Path(re.search(r"result (\S+)", proc.stdout).group(1))
    deadline = time.monotonic() + 180
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = Path(re.search(r"log (\S+),", proc.stdout).group(1)).read_text()
    assert "Job completed successfully" in log, log[-3000:]
    assert f"initialized the model weights from {tmp_path / 'ck' / 'cpt'} (saved at step 2)" in log
    assert result.parent == tmp_path / "logs"


def test_pipeline_script_chains_stages_and_the_conversion_job_exports_the_result(cluster, tmp_path):
    ck = tmp_path / "ck"
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), TINY, "cpt", "sft", "--", "--nodes=2",
                           "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                           f"--output={tmp_path}/%x-%j.out", "---", "training.train_steps=2", f"checkpoint.save={ck}",
                           f"logging.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=cluster, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split() for line in proc.stdout.splitlines())
    assert list(jobs) == ["cpt", "sft"]
    assert job_field(cluster, jobs["sft"], "Dependency").startswith(f"afterok:{jobs['cpt']}")
    assert wait_until_done(cluster, jobs["cpt"]) == "COMPLETED"
    assert wait_until_done(cluster, jobs["sft"]) == "COMPLETED"
    sft_log = (tmp_path / f"medmoe-tiny-sft-{jobs['sft']}.out").read_text()
    assert f"initialized the model weights from {ck / 'cpt'} (saved at step 2)" in sft_log, sft_log[-2000:]

    job = slurm(cluster, "sbatch", "--parsable", "--cpus-per-task=1", "--mem=1000", f"--output={tmp_path}/%x-%j.out",
                str(REPO / "slurm" / "convert.sbatch"), "mcore-to-hf", "--ckpt", str(ck / "sft"), "--out",
                str(tmp_path / "hf"), "--format", "qwen2_moe").strip()
    assert wait_until_done(cluster, job) == "COMPLETED", (tmp_path / f"medmoe-convert-{job}.out").read_text()
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def test_sbatch_template_with_one_torchrun_per_node(cluster, tmp_path):
    env = dict(cluster, LAUNCH="torchrun")
    job = slurm(env, "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%x-%j.out", f"--chdir={REPO}",
                str(REPO / "slurm" / "train.sbatch"), TINY, "--stage", "cpt", "training.train_steps=2",
                "checkpoint.save=null", f"logging.output_dir={tmp_path / 'run'}").strip()
    state = wait_until_done(cluster, job)
    log = (tmp_path / f"medmoe-train-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "launch torchrun" in log and "on 2 ranks" in log
    assert read_metrics(tmp_path / "run", "cpt")[-1]["step"] == 2
