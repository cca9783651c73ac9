"""One function reads rank and world from torchrun, Open MPI or Slurm variables."""
import pytest

from megatron_medmoe.runtime.env import LaunchEnvError, detect_launch_env, first_host


def test_no_launcher():
    assert detect_launch_env({"PATH": "/bin"}) is None


def test_torchrun():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                             "MASTER_PORT": "29400"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ("torchrun", 3, 4, 1, "n1", 29400)


def test_torchrun_without_rendezvous_is_an_error():
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR"):
        detect_launch_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_open_mpi_single_node():
    env = detect_launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == ("mpi", 1, 2, 1, "127.0.0.1")


def test_open_mpi_across_nodes_needs_master_addr():
    base = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    with pytest.raises(LaunchEnvError, match="mpirun -x MASTER_ADDR"):
        detect_launch_env(base)
    assert detect_launch_env({**base, "MASTER_ADDR": "gpu01"}).master_addr == "gpu01"


def test_slurm_step():
    env = detect_launch_env({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16",
                             "SLURM_NTASKS": "32", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
                             "SLURM_STEP_NODELIST": "gpu[003-004,010]"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == ("slurm", 5, 16, 1, "gpu003")
    assert env.master_port == 20000 + 1234


def test_slurm_batch_script_is_not_a_rank():
    assert detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}) is None


def test_torchrun_inside_slurm_wins():
    env = detect_launch_env({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
                             "RANK": "6", "WORLD_SIZE": "8", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert env.launcher == "torchrun" and env.rank == 6


@pytest.mark.parametrize("nodelist, host", [("n1", "n1"), ("n1,n2", "n1"), ("gpu[003-004,010]", "gpu003"),
                                            ("node[7]", "node7"), ("a-b[01-02],c", "a-b01")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_bad_integer_is_named():
    with pytest.raises(LaunchEnvError, match="RANK='x'"):
        detect_launch_env({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
