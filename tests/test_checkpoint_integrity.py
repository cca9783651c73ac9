"""Checkpoints that prove they are whole: every checkpoint has a manifest (size and checksum of each file,
written by the ranks that wrote the files); a damaged, missing or unreadable latest checkpoint is an error
naming the file (exit 3), never "complete" and never loaded; checkpoint.fallback loads the newest one that
verifies, loudly; a disk that fills up leaves the previous checkpoint the latest and no partial one."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO, read_metrics, run_medmoe, train_stage
from megatron_medmoe.runtime.exit_codes import EXIT_INPUT
from megatron_medmoe.training.manifest import MANIFEST, checkpoint_problem, files_of_rank, read_manifest

FAULTS = str(REPO / "tests" / "faults")


def args(root, *extra, steps):
    return train_stage("cpt", f"training.train_steps={steps}", "checkpoint.save_interval=2", "logging.log_interval=1",
                       f"checkpoint.save={root / 'ckpt'}", f"logging.output_dir={root / 'out'}", *extra)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A save directory with iter_2 and iter_4 (2 ranks, expert parallel)."""
    root = tmp_path_factory.mktemp("integrity")
    run_medmoe(args(root, steps=4))
    return root


def copy_of(two_checkpoints, tmp_path):
    shutil.copytree(two_checkpoints, tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "ckpt" / "cpt"


def test_the_manifest_lists_every_file_with_what_it_proves(two_checkpoints):
    latest = two_checkpoints / "ckpt" / "cpt" / "iter_0000004"
    files = read_manifest(str(latest))
    on_disk = sorted(p.name for p in latest.iterdir() if p.name != MANIFEST)
    assert sorted(files) == on_disk and {"common.pt", ".metadata", "__1_0.distcp", "run_config.yaml"} <= set(files)
    assert all(files[name]["size"] == (latest / name).stat().st_size for name in files)
    # each rank checksums the shards it wrote; rank 0 also the rest
    assert files_of_rank(str(latest), 1) == sorted(n for n in on_disk if n.startswith("__1_"))
    assert set(files_of_rank(str(latest), 0)) | set(files_of_rank(str(latest), 1)) == set(on_disk)
    assert checkpoint_problem(str(latest)) is None


def damage_bytes(path):  # 64 bytes overwritten inside, same size
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(bytes(64))


DAMAGES = {
    "truncated shard": (lambda c: os.truncate(c / "iter_0000004" / "__0_1.distcp", 1000),
                        "iter_0000004/__0_1.distcp is 1,000 bytes, its manifest says"),
    "deleted shard": (lambda c: (c / "iter_0000004" / "__1_0.distcp").unlink(), "iter_0000004/__1_0.distcp is missing"),
    "deleted .metadata": (lambda c: (c / "iter_0000004" / ".metadata").unlink(), "iter_0000004/.metadata is missing"),
    "deleted common.pt": (lambda c: (c / "iter_0000004" / "common.pt").unlink(), "iter_0000004/common.pt is missing"),
    "64 bytes overwritten": (lambda c: damage_bytes(c / "iter_0000004" / "__1_0.distcp"),
                             "iter_0000004/__1_0.distcp does not match its checksum"),
    "damaged manifest": (lambda c: (c / "iter_0000004" / MANIFEST).write_text('{"files": '), "manifest.json is damaged"),
    "binary latest": (lambda c: (c / "latest_checkpointed_iteration.txt").write_bytes(bytes(range(200, 256))),
                      "latest_checkpointed_iteration.txt is damaged: expected an iteration number, got 56 bytes"),
    "latest names a missing iteration": (lambda c: (c / "latest_checkpointed_iteration.txt").write_text("99\n"),
                                         "names iteration 99, but"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_is_never_complete(two_checkpoints, tmp_path, damage):
    """The stage's final step is the damaged checkpoint: it is not skipped as complete, it is an error."""
    root, ckpt = copy_of(two_checkpoints, tmp_path)
    apply, message = DAMAGES[damage]
    apply(ckpt)
    proc = run_medmoe(args(root, steps=4), check=False, timeout=120)
    assert proc.returncode == EXIT_INPUT, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "complete" not in proc.stdout
    assert "starting" not in proc.stdout  # refused by the launcher before any worker started


@pytest.mark.multiprocess
def test_resuming_from_a_damaged_latest_stops_or_falls_back_loudly(two_checkpoints, tmp_path):
    root, ckpt = copy_of(two_checkpoints, tmp_path)
    damage_bytes(ckpt / "iter_0000004" / "__1_0.distcp")
    refused = run_medmoe(args(root, steps=6), check=False)
    assert refused.returncode == EXIT_INPUT and "Traceback" not in refused.stderr
    assert "iter_0000004/__1_0.distcp does not match its checksum in manifest.json (the file is damaged). Nothing " \
           "was loaded" in refused.stderr and "--ckpt-fallback" in refused.stderr
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"

    fell_back = run_medmoe([*args(root, steps=6), "--ckpt-fallback"])
    assert f"WARNING: checkpoint.fallback: loading {ckpt / 'iter_0000002'} instead" in fell_back.stdout
    assert f"set aside {ckpt / 'iter_0000004'} as {ckpt / 'iter_0000004'}.damaged" in fell_back.stdout
    assert f"resuming from {ckpt} at step 2" in fell_back.stdout
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == \
        ["iter_0000002", "iter_0000004", "iter_0000004.damaged", "iter_0000006"]
    assert checkpoint_problem(str(ckpt / "iter_0000004")) is None  # step 4 trained again and saved whole
    assert [r["step"] for r in read_metrics(root / "out", "cpt")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.multiprocess
def test_conversion_and_evaluation_refuse_a_damaged_checkpoint_naming_the_file(two_checkpoints, tmp_path):
    root, ckpt = copy_of(two_checkpoints, tmp_path)
    (ckpt / "iter_0000004" / "__0_0.distcp").unlink()
    commands = {"convert": ["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"),
                            "--format", "qwen2_moe"],
                "eval": ["eval", "mcq", "--ckpt", str(ckpt), "--data", str(REPO / "examples/data/mcq/en.jsonl"),
                         "--limit", "1", "--output", str(tmp_path / "eval")]}
    for name, command in commands.items():
        proc = run_medmoe(command, check=False)
        assert proc.returncode == EXIT_INPUT and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert "iter_0000004/__0_0.distcp is missing" in proc.stderr, name
    assert not (tmp_path / "hf").exists() and not (tmp_path / "eval").exists()


def tmpfs(path, size):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system for a full disk needs mount (root): {mounted.stderr.decode().strip()}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("when", ["before writing", "while writing"])
def test_a_full_disk_keeps_the_previous_checkpoint_latest(tmp_path, when):
    """12 MiB holds one checkpoint of the tiny model (8 MiB), not two: the save of step 4 cannot fit. Seen
    before writing (free space against the checkpoint's size), or, with that check blinded, by the writers."""
    disk = tmp_path / "disk"
    tmpfs(disk, "12m")
    try:
        fault = {"PYTHONPATH": FAULTS, "MEDMOE_FAULT": "blind_disk:*:0"} if when == "while writing" else {}
        proc = run_medmoe(train_stage("cpt", "training.train_steps=6", "checkpoint.save_interval=2",
                                      f"checkpoint.save={disk}", f"logging.output_dir={tmp_path / 'out'}"),
                          check=False, **fault)
        assert proc.returncode == EXIT_INPUT, proc.stderr[-3000:]
        assert f"cannot save step 4 to {disk / 'cpt'}: not enough disk space (the checkpoint needs about 8.0 MiB" \
            in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(os.listdir(disk / "cpt")) == [".medmoe-run.lock", "iter_0000002",
                                                    "latest_checkpointed_iteration.txt"]
        assert (disk / "cpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
        assert checkpoint_problem(str(disk / "cpt" / "iter_0000002")) is None
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_manifest_that_names_no_sizes_is_damaged(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 1, "algorithm": "xxh3_128", "files": {"a.bin": {}}}))
    assert "manifest.json is damaged" in checkpoint_problem(str(tmp_path))
    (tmp_path / MANIFEST).unlink()
    assert f"{tmp_path} has no manifest.json" in checkpoint_problem(str(tmp_path))
