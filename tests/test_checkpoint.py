"""Finding a checkpoint to load: a save directory's latest, or a checkpoint directory itself; clear errors."""
import pytest

from megatron_medmoe.training.checkpoint import LATEST, CheckpointError, find_checkpoint, iteration_dir


def test_latest_of_a_save_directory(tmp_path):
    (tmp_path / "iter_0000020").mkdir()
    (tmp_path / LATEST).write_text("20\n")
    assert find_checkpoint(str(tmp_path)) == iteration_dir(str(tmp_path), 20)


def test_a_checkpoint_directory_itself(tmp_path):
    (tmp_path / "metadata.json").write_text("{}")
    assert find_checkpoint(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("latest, message", [(None, "no checkpoint in"), ("abc", "expected an iteration number"),
                                             ("30", "names iteration 30, but")])
def test_errors_name_the_problem(tmp_path, latest, message):
    if latest is not None:
        (tmp_path / LATEST).write_text(latest)
    with pytest.raises(CheckpointError, match=message):
        find_checkpoint(str(tmp_path))
