"""MLflow tracking: one run per stage, nested under one run per pipeline run, lineage on each.

Every run carries the same lineage tags, so any model version can be walked back to the data,
code and parameters that made it:

    rlhf.git_commit, rlhf.git_dirty   the code (also as MLflow's own mlflow.source.git.commit)
    rlhf.data_md5                     the data version: the md5 of the .dvc file (data.dvc) that
                                      tracks every file read; else DVC's hash of the files read.
                                      After the gate, the version it read and pinned with its
                                      copies (``rlhf_tasks/dataversion.py``)
    rlhf.data_dvc_tracked             whether DVC versions that data (a warning when it does not)
    rlhf.data_paths                   the data files and directories params' ``data`` names
    rlhf.dvc_remote                   where DVC stores that version (the default remote's URL)
    rlhf.params_hash                  sha256 of the whole resolved params (all sections)
    rlhf.prefect_flow_run_id          when Prefect runs the pipeline
    rlhf.upstream.<stage>             the run id of each upstream stage whose outputs it read

A stage's run also holds the params of the sections it reads (its registry entry's, flattened
as ``section.key``), its datasets as MLflow inputs (digest = the DVC md5, context train or eval),
its final metrics, the small files it wrote (metrics.json, reports, plots), and for ``reward``
and ``policy`` the model, logged with MLflow's transformers flavor. TRL's trainers log their
per-step metrics into the stage's run (``report_to="mlflow"``); PPO logs one step per update.

Where a stage's run is recorded: ``artifacts/mlflow_runs/<stage>.json`` (run id, model id,
store), which is how later stages find their upstream runs (outside every DVC output, so the
record never changes what ``dvc status`` sees). The store is ``MLFLOW_TRACKING_URI`` when set,
else ``sqlite:///mlflow.db`` in the project directory with artifacts in ``mlruns/``. URLs are
recorded without the credentials they may embed (``redact_url``): the store's in that file, the
DVC remote's in ``rlhf.dvc_remote``.

The package is split by concern, and imports nothing itself: ``store`` (where the tracking store
is, credentials kept out of URLs, a server that goes away), ``lineage`` (the tags above),
``runs`` (the pipeline's and the stages' runs, orphaned runs), ``logged_models`` (models in and
out of MLflow) and ``progress`` (per-step metrics and Prefect progress while a stage trains).
Stage functions import none of it: the runner (``rlhf_tasks/runner.py``) tracks them.
"""
