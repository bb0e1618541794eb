"""Studies: many runs of one base config, and what is learned from them.

    spec.py       the study file: base config, axes (a grid), variants, repeats, search space;
                  every run's config validated before any run starts (load_study -> Study)
    executors.py  where the runs execute (this machine, a Dask cluster, Slurm) and run_jobs
    warm.py       warm run starts: each run forked from a warm process per worker (imports done, data read once)
    results.py    the tables (results.csv, results.md), the figures and the study report
    tune.py       hyperparameter search on Optuna over a study's `search` block (space.py: that block
                  checked whole before the storage is touched)
    reach.py      whether a scheduler, a Slurm controller or a storage answers, in a bounded wait

Nothing here imports the public API (api.py) or the command line (cli.py): a search's trials are
trained by the `fit` function its caller passes in.
"""
