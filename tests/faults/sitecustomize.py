"""Fault injection for tests: Python imports this module at start-up in every process whose PYTHONPATH
holds tests/faults, so the `medmoe train` worker ranks of a real run can be made to fail on cue.

MEDMOE_FAULT=KIND:RANK:WHEN, acted on only by the rank RANK (the RANK variable every worker has; * for all):
  kill_in_save:R:STEP   SIGKILL rank R right after it wrote its part of the checkpoint of step STEP,
                        before the other ranks finished (the checkpoint must never become the latest)
  nan_loss:R:CALL       the CALL-th micro-batch loss (0-based, counted on rank R) becomes NaN
  inf_grad:R:CALL       the CALL-th micro-batch loss stays finite but its gradient becomes inf
  blind_disk:*:0        the check for free space before a save passes, so a save starts on a disk that cannot
                        hold it (which then fills up while writing)
  signal_at:R:PHASE     rank R sends itself SIGTERM at a point of its start-up: PHASE is model (building the
                        model), load (loading a checkpoint) or data (building the data order)
"""
import os
import signal


def _install(kind: str, when) -> None:
    if kind == "kill_in_save":
        from megatron.core import dist_checkpointing

        from megatron_medmoe.training import checkpoint

        class KillAfterSave:
            def __getattr__(self, name):
                return getattr(dist_checkpointing, name)

            @staticmethod
            def save(sharded, path, *args, **kwargs):
                result = dist_checkpointing.save(sharded, path, *args, **kwargs)
                if sharded["train_state"]["iteration"] == when:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

        checkpoint.dist_checkpointing = KillAfterSave()
    elif kind in ("nan_loss", "inf_grad"):
        from megatron_medmoe.training import step

        original, calls = step.masked_token_loss, [0]

        def faulty(*args, **kwargs):
            loss, tokens, report = original(*args, **kwargs)
            calls[0] += 1
            if calls[0] - 1 == when:
                if kind == "nan_loss":
                    loss = loss * float("nan")
                    report = {**report, "lm loss": report["lm loss"] * float("nan")}
                else:
                    loss.register_hook(lambda grad: grad * float("inf"))
            return loss, tokens, report

        step.masked_token_loss = faulty
    elif kind == "blind_disk":
        from megatron_medmoe.training import checkpoint

        check = checkpoint._check_free_space
        checkpoint._check_free_space = lambda save_dir, needed, iteration: check(save_dir, 0, iteration)
    elif kind == "signal_at":
        _signal_at(when)
    else:
        raise ValueError(f"MEDMOE_FAULT: unknown kind {kind!r}")


def _signal_at(phase: str) -> None:
    from megatron_medmoe.training import loop

    name = {"model": "build_model_chunks", "load": "load_checkpoint", "data": "TrainingData"}[phase]
    original = getattr(loop, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    setattr(loop, name, signalled)


_fault = os.environ.get("MEDMOE_FAULT")
if _fault and os.environ.get("MEDMOE_LOCAL_WORKER") == "1" and os.environ.get("RANK") is not None:
    _kind, _rank, _when = _fault.split(":")
    if _rank == "*" or int(os.environ["RANK"]) == int(_rank):
        _install(_kind, _when if _kind == "signal_at" else int(_when))
