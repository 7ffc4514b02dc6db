"""The stages of the RLHF pipeline, one module per stage, importable without Prefect.

Each stage module exposes one entry function that takes a typed config (from ``params.yaml``)
and input locations and returns output locations and a metrics dict. Prefect (``flows/``), the
``rlhf`` CLI (which ``dvc.yaml`` calls) and the tests all call that same function.
"""

__version__ = "0.1.0"
