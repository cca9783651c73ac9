"""Exit codes of `medmoe` commands. Launchers (slurm/, `medmoe submit`) requeue on EXIT_REQUEUE."""

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error (traceback printed)
EXIT_CONFIG = 2  # the configuration or the options cannot work; nothing was started
EXIT_INPUT = 3  # a dataset, tokenizer or checkpoint cannot be used
EXIT_NONFINITE = 4  # training stopped at a non-finite loss or gradient (training.on_nonfinite=stop)
EXIT_REQUEUE = 75  # stopped early by a signal or the wall-clock limit, after saving: run again to resume (EX_TEMPFAIL)
