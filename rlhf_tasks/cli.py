"""The ``rlhf`` command line.

    rlhf validate [PATH ...] [--heldout PATH ...]  the validation gate (default: params' data);
                                                   its report in artifacts/checks/validate/
    rlhf data demo [--check] [--force]             write the demo data set into data/
    rlhf stage NAME                                run one stage as dvc.yaml calls it
    rlhf run                                       every stage in order (the Prefect flow)
    rlhf dvc-yaml [--check]                        write dvc.yaml from the stage registry
    rlhf ingest BATCH [--retrain]                  validate a batch and add it to data/ (DVC)
    rlhf metrics                                   the key metrics of the last run, as a table
    rlhf models                                    registered versions, aliases, decisions
    rlhf promote --version N                       make policy version N the champion by hand
    rlhf rollback                                  the champion alias back to the previous one
    rlhf lineage NAME@alias | NAME/version         data md5, DVC remote, commit, runs, params
    rlhf generate "PROMPT" [--model REF]           a response from the champion policy
    rlhf annotate serve [--port N]                 a local Label Studio on 127.0.0.1
    rlhf annotate simulate [--per-task N]          the demo's annotators label open tasks
    rlhf collect                                   answers of the champion as Label Studio tasks
    rlhf collect pull [--retrain]                  completed annotations -> pairs -> rlhf ingest
    rlhf rounds N [--per-task K]                   N rounds of RLHF on the demo: collect, the
                                                   demo's annotators, pull, retrain, evaluate

Every command takes ``--params FILE`` and DVC-style overrides ``-S section.key=value``.
Exit codes: 0 success (valid data), 1 invalid data or nothing to do (rollback), 2 usage or
configuration error, 3 another `rlhf run` or `rlhf ingest` is running in this project, 4 a
resource the run relies on failed (a checkpoint could not be written, the MLflow tracking server
did not answer). A user mistake prints one message, never a traceback.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from rlhf_tasks import environment, projectlock
from rlhf_tasks.config import DEFAULT_PARAMS, Params, load_params
from rlhf_tasks.errors import ConfigError, DataError, UserError
from rlhf_tasks.metrics import metrics_table
from rlhf_tasks.runner import run_stage
from rlhf_tasks.stages import STAGES

# Where `rlhf validate` leaves its report: a check of a file never touches the pipeline's state
# (the validate stage's outputs are written by the validate stage alone).
CHECKS_DIR = Path("artifacts/checks/validate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too, but with its own wording
        self.print_usage(sys.stderr)
        raise ConfigError(f"{self.prog}: {message}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)"
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. -S validate.min_rows=50 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf", description="RLHF pipeline: validate, train, evaluate, promote.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("init", help="write a params file for your model and data")
    p.add_argument("--model", required=True, help="the base model: a local directory or hub id")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="preference pairs (training and held-out), SFT demonstrations, optionally prompts",
    )
    p.add_argument(
        "--out", default=str(DEFAULT_PARAMS), help="file to write (default: params.yaml)"
    )
    p.add_argument("--force", action="store_true", help="replace the file if it exists")

    p = sub.add_parser("validate", help="run the data-validation gate")
    p.add_argument("paths", nargs="*", help="files or directories (default: params.yaml's data)")
    p.add_argument("--heldout", nargs="+", help="held-out files, checked for shared prompts")
    p.add_argument(
        "--out",
        default=str(CHECKS_DIR),
        help=f"report directory (default: {CHECKS_DIR}; never the validate stage's outputs)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="also build Great Expectations' Data Docs (HTML) in the report directory",
    )
    _common(p)

    p = sub.add_parser("data", help="data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    d = data_sub.add_parser("demo", help="write the embedded demo data set into data/")
    d.add_argument("--force", action="store_true", help="overwrite data/ files that differ")
    d.add_argument("--check", action="store_true", help="then check data/ against data.dvc")
    _common(d)

    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    p.add_argument("name", choices=list(STAGES))
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # for rlhf_tasks.launch
    _common(p)

    p = sub.add_parser("run", help="run every stage in order, as the Prefect flow rlhf_pipeline")
    _common(p)

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage registry")
    p.add_argument("--check", action="store_true", help="only check that dvc.yaml is current")
    _common(p)

    p = sub.add_parser("metrics", help="the key metrics of the last run (artifacts/), as a table")
    _common(p)

    p = sub.add_parser("ingest", help="validate a batch of preference pairs and add it to data/")
    p.add_argument(
        "batch", help="a file (.jsonl, .json, .csv, .parquet) or directory of preference pairs"
    )
    p.add_argument("--no-commit", action="store_true", help="do not git commit data.dvc")
    p.add_argument("--no-push", action="store_true", help="do not dvc push")
    p.add_argument(
        "--retrain", action="store_true", help="then trigger the rlhf-retrain deployment"
    )
    _common(p)

    p = sub.add_parser("models", help="registered model versions, aliases and decisions")
    _common(p)
    p = sub.add_parser("promote", help="make a policy version the champion by hand (recorded)")
    p.add_argument("--version", type=int, required=True, help="policy version number")
    _common(p)
    p = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    _common(p)
    p = sub.add_parser("lineage", help="the data, code, params and runs behind a model version")
    p.add_argument("ref", help="NAME@alias or NAME/version, e.g. rlhf-demo-policy@champion")
    _common(p)
    p = sub.add_parser("annotate", help="Label Studio: the local server, the demo's annotators")
    annotate_sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    a = annotate_sub.add_parser("serve", help="run a local Label Studio on 127.0.0.1")
    a.add_argument("--port", type=int, default=8080)
    a.add_argument("--database", help="postgresql://user@host:port/name (default: SQLite)")
    _common(a)
    a = annotate_sub.add_parser("simulate", help="the demo's simulated annotators label tasks")
    a.add_argument("--per-task", type=int, default=1, help="people per task (default 1)")
    a.add_argument("--seed", type=int, default=0)
    _common(a)

    p = sub.add_parser("collect", help="ask people in Label Studio to compare the policy's answers")
    collect_sub = p.add_subparsers(dest="action", parser_class=_Parser)
    c = collect_sub.add_parser("pull", help="ingest the completed annotations as preference pairs")
    c.add_argument("--no-commit", action="store_true", help="do not git commit data.dvc")
    c.add_argument("--no-push", action="store_true", help="do not dvc push")
    c.add_argument("--retrain", action="store_true", help="then trigger rlhf-retrain")
    _common(c)
    _common(p)

    p = sub.add_parser("rounds", help="iterated RLHF on the demo, the demo's annotators labelling")
    p.add_argument("rounds", type=int, help="how many rounds")
    p.add_argument("--per-task", type=int, default=3, help="annotators per task (default 3)")
    p.add_argument("--no-push", action="store_true", help="do not dvc push each round's data")
    _common(p)

    p = sub.add_parser("generate", help="a response from a registered policy (the champion)")
    p.add_argument("prompt")
    p.add_argument("--model", help="NAME@alias or NAME/version (default: <prefix>-policy@champion)")
    _common(p)
    return parser


def cmd_validate(args: argparse.Namespace, params: Params) -> int:
    from rlhf_tasks import validate

    report, result = validate.validate(
        params,
        paths=args.paths or None,
        heldout=args.heldout,
        out_dir=Path(args.out),
        data_docs=args.docs,
    )
    print(validate.summary(report, result["outputs"]))
    return 0 if report.valid else 1


def check_data_version(dvc_file: Path) -> str:
    """Check that the workspace data matches ``dvc_file`` and is in the DVC cache; return md5.

    A fresh clone regenerates the demo data: it matches data.dvc but is not yet in the cache, so
    it is committed to the cache (the .dvc file is unchanged: its hash was checked first).
    """
    from dvc.repo import Repo

    if not dvc_file.exists():
        raise ConfigError(f"{dvc_file}: no such file; track the data with `dvc add`")
    with Repo(".") as repo:
        (stage,) = repo.stage.collect(str(dvc_file))
        (out,) = stage.outs
        if out.changed_checksum():
            raise DataError(
                f"{out} does not match {dvc_file} (md5 {out.hash_info.value}). If you changed the "
                f"data on purpose, run `dvc add {out}` and commit {dvc_file}; to restore the "
                "recorded version, `dvc checkout` (or `rlhf data demo --force` for the demo data)."
            )
        if out.changed_cache():
            repo.commit(str(dvc_file), force=True)
        return out.hash_info.value


def cmd_data_demo(args: argparse.Namespace, params: Params) -> int:
    from rlhf_tasks import demo

    data = params.data
    with tempfile.TemporaryDirectory() as tmp:
        stats = demo.generate(params.demo, data, root=Path(tmp))
        written, same, differ = [], [], []
        for rel in sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file()):
            fresh, current = Path(tmp) / rel, Path(rel)
            if not current.exists():
                written.append(rel)
            elif filecmp.cmp(fresh, current, shallow=False):
                same.append(rel)
            else:
                differ.append(rel)
        if differ and not args.force:
            raise DataError(
                "these files differ from the demo data and were left as they are: "
                + ", ".join(map(str, differ))
                + ". If DVC has them (`dvc status`), restore with `dvc checkout`; to replace them "
                "with the demo data, pass --force."
            )
        for rel in written + differ:
            Path(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, rel)
    pref = stats["preferences"]
    print(
        f"demo data in {data.dir}/: {len(written) + len(differ)} file(s) written, {len(same)} "
        f"unchanged; {stats['sft']['rows']} SFT demonstrations, {pref['train']['pairs']} + "
        f"{pref['heldout']['pairs']} preference pairs, {stats['prompts']['train']} RL and "
        f"{stats['prompts']['heldout']} held-out prompts"
    )
    print(
        "annotators agree with the gold order on "
        f"{100 * pref['train']['agreement_with_gold']:.1f}% (train) and "
        f"{100 * pref['heldout']['agreement_with_gold']:.1f}% (held-out) of pairs: the ceiling "
        "for reward-model accuracy"
    )
    if args.check:
        dvc_file = Path(f"{data.dir}.dvc")
        print(f"{data.dir}/ matches {dvc_file} (md5 {check_data_version(dvc_file)})")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from rlhf_tasks.stages import dvc_yaml

    path, text = Path("dvc.yaml"), dvc_yaml()
    current = path.read_text() if path.exists() else ""
    if args.check:
        if current != text:
            print(f"{path} differs from the stage registry: run `rlhf dvc-yaml`", file=sys.stderr)
            return 1
        print(f"{path} is the stage registry's")
        return 0
    path.write_text(text)
    print(f"{path} {'unchanged' if current == text else 'written'} from rlhf_tasks/stages.py")
    return 0


def cmd_stage(args: argparse.Namespace, params: Params) -> int:
    from rlhf_tasks import launch

    if launch.inside() and not launch.is_main():
        # What the other processes print (the same row counts, the same messages) goes to the
        # console only: the main process's stdout is the stage's, in the run's Prefect log.
        sys.stdout = sys.stderr
    # Under `accelerate launch` from a tracked pipeline: nest under its run (launch.py).
    result = run_stage(args.name, params, os.environ.get(launch.PARENT_RUN_ENV) or None)
    if launch.inside() and not launch.is_main():
        return 0
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(result))
    print(f"stage {args.name}: {json.dumps(result['outputs'])}")
    return 0


def _failed(state: Any, what: str) -> bool:
    """A flow run's final state: a user's mistake is raised (its message and exit code), any
    other failure printed; True if the run failed."""
    if state.is_completed():
        return False
    failure = state.result(raise_on_failure=False)
    if isinstance(failure, UserError):
        raise failure
    print(f"rlhf: {what} failed: {state.message}", file=sys.stderr)
    return True


def cmd_run(args: argparse.Namespace, params: Params) -> int:
    from flows.api import temporary_api
    from rlhf_tasks import preflight
    from rlhf_tasks.tracking import store

    # A mistake in the params stops the run here, before it takes the project or starts an API.
    preflight.check(params)
    with projectlock.hold("`rlhf run`"), temporary_api() as api:
        from flows.pipeline import rlhf_pipeline

        store.configure(params)  # opens (and, the first time, creates) the MLflow store
        if api is not None:
            api.wait()
        state = rlhf_pipeline(params_path=args.params, overrides=args.overrides, return_state=True)
    if _failed(state, "pipeline"):
        return 1
    print(metrics_table())
    decision = STAGES["promote"].workdir / "decision.json"
    if decision.exists():
        d = json.loads(decision.read_text())
        verdict = "champion" if d["promoted"] else "rejected: " + "; ".join(d["reasons"])
        if not d.get("new_version", True):
            verdict = "no new version (cached stages made no new model); " + (
                "it is the champion" if d["promoted"] else "it is not the champion"
            )
        print(f"{d['model']} version {d['version']}: {verdict}")
    return 0


def cmd_init(args: argparse.Namespace, argv: list[str]) -> int:
    from rlhf_tasks import init

    plan = init.write(args.model, args.data, Path(args.out), args.force, argv[1:])
    print(f"wrote {args.out}:")
    for note in plan.notes:
        print(f"  {note}")
    print(
        "next: `rlhf validate` (the gate on this data), then `rlhf run`; commit the params file "
        "and `dvc add` the data it names"
    )
    return 0


def _ingest_options(args: argparse.Namespace) -> dict[str, bool]:
    """What `rlhf ingest` and `rlhf collect pull` do after the gate (their shared flags)."""
    return {"commit": not args.no_commit, "push": not args.no_push, "retrain": args.retrain}


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.api import temporary_api

    with projectlock.hold("`rlhf ingest`"):
        if not Path(args.batch).exists():
            raise ConfigError(f"{args.batch}: no such file or directory")
        with temporary_api() as api:
            from flows.ingest import rlhf_ingest

            if api is not None:
                api.wait()
            state = rlhf_ingest(
                args.batch, args.params, args.overrides, **_ingest_options(args), return_state=True
            )
    return 1 if _failed(state, "ingestion") else 0


def cmd_registry(args: argparse.Namespace, params: Params) -> int:
    from rlhf_tasks import promote, registry

    if args.command == "models":
        print(registry.models_table(params))
    elif args.command == "promote":
        print(promote.promote_version(params, args.version))
    elif args.command == "rollback":
        changed, message = promote.rollback(params)
        print(message, file=sys.stdout if changed else sys.stderr)
        return 0 if changed else 1
    elif args.command == "lineage":
        print(registry.lineage(args.ref))
    else:
        print(registry.generate(params, args.prompt, args.model))
    return 0


def cmd_annotate(args: argparse.Namespace, params: Params) -> int:
    from rlhf_tasks import collect, labelstudio

    if args.action == "serve":
        process, where = labelstudio.start(port=args.port, database=args.database)
        credentials = labelstudio.LOCAL_DIR / labelstudio.CREDENTIALS
        print(
            f"Label Studio at {where.url} (data in {labelstudio.LOCAL_DIR}/); log in as "
            f"{labelstudio.ADMIN} with the password in {credentials}. Ctrl-C stops it.",
            flush=True,
        )
        # Ctrl-C or SIGTERM stops the server too (it runs in a process group of its own). Also
        # when this process inherited SIGINT ignored, as a job started with `&` by a script
        # does (or a test process after Prefect ran flows in it): Python then installs no
        # KeyboardInterrupt for it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            code = process.wait()
        except KeyboardInterrupt:
            print("stopping Label Studio", flush=True)
            return 0
        finally:
            labelstudio.stop(process)
        log = labelstudio.LOCAL_DIR / "server.log"
        raise labelstudio.LabelStudioError(f"Label Studio exited with code {code}; see {log}")
    with labelstudio.LabelStudio(labelstudio.server()) as client:
        done = collect.simulate(params, client, args.per_task, args.seed)
    print(f"{done.get('annotations', 0)} annotation(s) of {done.get('tasks', 0)} open task(s)")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from flows.api import temporary_api
    from rlhf_tasks import labelstudio

    # A server that is down or refuses the key fails here, before a Prefect API is started.
    with labelstudio.LabelStudio(labelstudio.server()) as client:
        client.whoami()
    with projectlock.hold("`rlhf collect`"), temporary_api() as api:
        from flows.collect import rlhf_collect, rlhf_collect_pull

        if api is not None:
            api.wait()
        if args.action == "pull":
            state = rlhf_collect_pull(
                args.params, args.overrides, **_ingest_options(args), return_state=True
            )
        else:
            state = rlhf_collect(args.params, args.overrides, return_state=True)
    if _failed(state, "collection"):
        return 1
    result = state.result()
    if args.action == "pull" and result["batch"] is None:
        return 1  # nothing to do: no completed task is new
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    from flows.api import temporary_api
    from rlhf_tasks import labelstudio

    if args.rounds < 1:
        raise ConfigError(f"rlhf rounds: N must be at least 1, got {args.rounds}")
    with labelstudio.LabelStudio(labelstudio.server()) as client:
        client.whoami()  # a server that is down fails here, before a Prefect API is started
    with projectlock.hold("`rlhf rounds`"), temporary_api() as api:
        from flows.collect import rlhf_rounds

        if api is not None:
            api.wait()
        state = rlhf_rounds(
            args.rounds, args.params, args.overrides, args.per_task, not args.no_push,
            return_state=True,
        )  # fmt: skip
    return 1 if _failed(state, "rounds") else 0


def main(argv: list[str] | None = None) -> int:
    environment.set_defaults()
    try:
        args = _parser().parse_args(argv)
        if args.command == "init":
            return cmd_init(args, argv if argv is not None else sys.argv[1:])
        params = load_params(args.params, args.overrides)
        if args.command == "validate":
            return cmd_validate(args, params)
        if args.command == "data":
            return cmd_data_demo(args, params)
        if args.command == "run":
            return cmd_run(args, params)
        if args.command == "dvc-yaml":
            return cmd_dvc_yaml(args)
        if args.command == "ingest":
            return cmd_ingest(args)
        if args.command == "annotate":
            return cmd_annotate(args, params)
        if args.command == "collect":
            return cmd_collect(args)
        if args.command == "rounds":
            return cmd_rounds(args)
        if args.command == "metrics":
            print(metrics_table())
            return 0
        if args.command in ("models", "promote", "rollback", "lineage", "generate"):
            return cmd_registry(args, params)
        return cmd_stage(args, params)
    except UserError as exc:
        print(f"rlhf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
