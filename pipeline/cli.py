"""``pipeline <stage> CONFIG [section.key=value ...]``: a thin CLI over the library.

Heavy modules (torch, timm, albumentations) are imported inside each command so that
``--help`` and config errors answer at once. ``main(argv)`` returns the exit code, so tests
call it in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.core.errors import PipelineError, describe_os_error  # noqa: E402


def _config(args, check_data: bool = True, plan: str = "use"):
    """The command's config, its ``auto`` values resolved by the run's plan: ``make`` it when missing
    (the commands that train), ``use`` an existing one (one line when there is none), ``peek``
    (apply one if there is one: status, experiments), or ``none`` (the stage function plans and times it)."""
    from pipeline.config.load import load_config
    from pipeline.plan.store import parse_budget, planned

    overrides = list(args.overrides)
    params = getattr(args, "params", None)
    if params:
        overrides = _params_overrides(params) + overrides
    budget = getattr(args, "budget", None)
    if budget is not None:  # after the overrides: the flag wins over train.time_budget_s=...
        overrides.append(f"train.time_budget_s={parse_budget(budget)}")
    cfg = load_config(args.config, overrides, check_data=check_data)
    return cfg if plan == "none" else planned(cfg, create=plan == "make", require=plan == "use")


def _params_overrides(path: str) -> list[str]:
    """A YAML of ``section.key: value`` (as ``tune`` writes best.yaml) as override strings."""
    from pathlib import Path

    import yaml

    from pipeline.config.load import _read_yaml

    d = _read_yaml(Path(path))
    out = []
    for k, v in d.items():
        if not isinstance(k, str) or "=" in k or not all(part.strip() for part in k.split(".")):
            raise PipelineError(
                f"{path}: key {k!r} is not a dotted config key; expected section.key: value lines like train.lr: 0.001"
            )
        if "." not in k and isinstance(
            v, dict
        ):  # an override replaces: `train: {lr: ..}` would drop the other train keys
            raise PipelineError(
                f"{path}: {k}: a whole section; expected section.key: value lines like {k}.{next(iter(v), 'key')}: ..."
            )
        out.append(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


# ---- commands -------------------------------------------------------------------------


def cmd_demo_data(args):
    from pathlib import Path

    from pipeline.data import demo as demo_data

    kw = {"seed": args.seed}
    if args.n_test is not None:
        kw["n_test"] = args.n_test
    if args.n_train is not None:
        if args.kind == "digits":
            raise PipelineError("demo-data digits: --n-train is fixed by the 5,000 bundled digits; use --n-test")
        kw["n_train"] = args.n_train
    summary = demo_data.WRITERS[args.kind](Path(args.out), **kw)
    print(f"wrote {args.kind} demo data to {args.out}: {summary}")


def cmd_fold(args):
    from pipeline.data.folds import run_fold

    run_fold(_config(args, plan="make"))


def cmd_train(args):
    from pipeline.train.cv import train_cv
    from pipeline.train.distributed import DistContext

    folds = _int_list(args.folds, "--folds") if args.folds else None
    dist = DistContext.from_env()
    if not dist.active:  # no torchrun (or a world of one): no process group
        train_cv(_config(args, plan="make"), folds=folds)
        return
    from pipeline.plan.store import planned

    cfg = _config(args, plan="none")
    device = dist.check(cfg)  # what a world cannot run is one line before any process group
    with dist.running(device):
        # rank 0 makes the plan (it may time the model); every rank trains the config it planned
        cfg = dist.broadcast_decision(lambda: planned(cfg, create=True, require=False))
        train_cv(cfg, folds=folds, dist=dist)


def cmd_augment(args):
    from pathlib import Path

    import numpy as np

    from pipeline.data.augment import build_augment, preview_grid
    from pipeline.data.formats import read_table
    from pipeline.runs.layout import RunDir

    cfg = _config(args, plan="make")
    t = read_table(cfg, "train")
    aug = build_augment(
        cfg.augment, t.value_range, t.channels, t.image_size, seed=cfg.train.seed, where=f"{cfg.path}: augment"
    )
    out = Path(args.out or RunDir.of(cfg).augment_preview)
    idx = np.random.default_rng(cfg.train.seed).choice(len(t), size=min(args.n, len(t)), replace=False)
    preview_grid(t.images[np.sort(idx)], aug, out, n=len(idx), value_range=t.value_range)
    print(f"wrote {out}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"command line: {flag} {text!r}; expected comma-separated integers like 0,2") from None


def cmd_evaluate(args):
    from pipeline.evaluate.compare import compare
    from pipeline.evaluate.evaluator import evaluate

    if args.compare:
        if args.config or args.overrides:
            raise PipelineError("command line: evaluate --compare takes run directories only, not a config")
        compare(args.compare)
        return
    if not args.config:
        raise PipelineError("command line: evaluate needs a CONFIG (or --compare RUN_DIR RUN_DIR ...)")
    evaluate(_config(args))


def cmd_adversarial(args):
    from pipeline.evaluate.adversarial import adversarial

    adversarial(_config(args))


def cmd_tune(args):
    from pipeline.tune.tuner import tune

    pinned = [o.split("=", 1)[0].strip() for o in args.overrides]
    tune(
        _config(args, plan="make"),
        n_trials=args.n_trials,
        max_trials=args.max_trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study,
        pinned=pinned,
    )


def cmd_predict(args):
    from pipeline.predict.predictor import submit_experiment

    submit_experiment(_config(args))


def cmd_export(args):
    from pipeline.predict.export import export_onnx_run

    if not args.onnx:
        raise PipelineError("export: choose the format: --onnx (the one this version writes)")
    export_onnx_run(_config(args), parity_rows=args.parity_rows)


def cmd_ensemble(args):
    from pipeline.ensemble.blend import run_ensemble

    run_ensemble(args.config, list(args.overrides))


def cmd_zoo(args):
    from pipeline.zoo import run_zoo

    run_zoo(args.config, list(args.overrides), ensemble=args.ensemble)


def cmd_validate_submission(args):
    from pipeline.predict.submission import check_submission

    check_submission(_config(args), args.file, solution=args.solution)


def cmd_experiments(args):
    from pipeline.evaluate.experiments import list_experiments

    list_experiments(_config(args, check_data=False, plan="peek"))


def cmd_lb(args):
    from pipeline.evaluate.kaggle_api import lb_command

    lb_command(args.submission, args.score, fetch=args.fetch, competition=args.competition)


def cmd_submit(args):
    from pipeline.evaluate.kaggle_api import submit

    submit(args.file, args.message, args.competition)


def cmd_run(args):
    from pipeline.stages import run_all

    run_all(_config(args, plan="none"))  # run_all makes the plan and counts its time among the stages


def cmd_status(args):
    from pipeline.stages import status

    status(_config(args, check_data=False, plan="peek"))


class _Parser(argparse.ArgumentParser):
    """argparse, keeping the one-line error contract (usage goes to ``--help``)."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {_one_line(message)}; see `{self.prog} --help`")


class _UsageError(Exception):
    """A command line argparse refused; ``main`` prints it as the one line and returns 2."""


def _one_line(text: str) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def _finite(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v}: expected a positive whole number")
    return v


BUDGET_HELP = "training time to plan for: 900s, 15m, 1h (the same as train.time_budget_s)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pipeline", description="Kaggle image-classification competition pipeline")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    # in the order ``--help`` lists them
    _add_demo_data(sub)
    _add_training(sub)
    _add_evaluation(sub)
    _add_search_and_blends(sub)
    _add_records(sub)
    return p


def _stage(sub, name, fn, help, data=True, budget=False):
    """A command that takes a CONFIG and ``section.key=value`` overrides (and ``--budget`` with ``budget``)."""
    sp = sub.add_parser(name, help=help, description=help)
    sp.add_argument("config", help="competition/experiment YAML")
    sp.add_argument("overrides", nargs="*", help="section.key=value overrides")
    if budget:  # every command that finds the run by its config hash takes it, as it takes overrides
        sp.add_argument("--budget", help=BUDGET_HELP)
    sp.set_defaults(fn=fn)
    return sp


def _add_demo_data(sub) -> None:
    d = sub.add_parser("demo-data", help="write a demo competition in Kaggle's file format")
    # demo_data.WRITERS's names, spelt out: importing demo_data (pandas, scipy) would slow every command's start
    d.add_argument("kind", choices=["iceberg", "digits", "folder", "shift-folder", "shift-digits", "hard-digits"])
    d.add_argument("--out", required=True)
    d.add_argument("--n-train", type=_positive_int)
    d.add_argument("--n-test", type=_positive_int)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo_data)


def _add_training(sub) -> None:
    """fold, train, augment."""
    _stage(sub, "fold", cmd_fold, "write folds/<competition>.csv (id,fold)", budget=True)
    t = _stage(
        sub, "train", cmd_train, "train one model per fold; writes runs/<competition>/<experiment>/", budget=True
    )
    t.add_argument("--folds", help="comma-separated fold numbers to train (default: all)")
    t.add_argument("--params", help="YAML of section.key: value overrides (e.g. tune's best.yaml)")
    a = _stage(sub, "augment", cmd_augment, "preview the configured augmentation as a PNG grid", budget=True)
    a.add_argument("--n", type=_positive_int, default=8, help="number of training images in the grid")
    a.add_argument("--out", help="PNG path (default runs/<competition>/<experiment>/augment_preview.png)")


def _add_evaluation(sub) -> None:
    """evaluate, adversarial."""
    e = sub.add_parser(
        "evaluate",
        help="metrics.json, report/ and a terminal table from oof.csv",
        description="metrics.json, report/ and a terminal table from oof.csv",
    )
    e.add_argument("config", nargs="?", help="competition/experiment YAML")
    e.add_argument("overrides", nargs="*", help="section.key=value overrides")
    e.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="print runs side by side (same folds)")
    e.add_argument("--budget", help=BUDGET_HELP)
    e.set_defaults(fn=cmd_evaluate)
    _stage(
        sub,
        "adversarial",
        cmd_adversarial,
        "train-vs-test classifier: shift AUC, test-like rows, duplicate pairs -> adversarial.json",
        budget=True,
    )


def _add_search_and_blends(sub) -> None:
    """tune, predict, ensemble, zoo."""
    tu = _stage(sub, "tune", cmd_tune, "Optuna search over tune.space; writes runs/<competition>/tune/", budget=True)
    tu.add_argument("--n-trials", type=int, help="trials this process runs (default tune.n_trials)")
    tu.add_argument("--max-trials", type=int, help="cap on the study's total trials across all workers")
    tu.add_argument("--timeout", type=_finite, help="seconds this process may search")
    tu.add_argument(
        "--storage", help="SQLAlchemy URL (e.g. postgresql://...); default a SQLite file under runs/<competition>/tune/"
    )
    tu.add_argument("--study", help="study name (default <experiment>)")
    pr = _stage(
        sub, "predict", cmd_predict, "test predictions with TTA -> test_pred.csv and a submission file", budget=True
    )
    pr.add_argument("--params", help="YAML of section.key: value overrides (e.g. tune's best.yaml)")
    ex = _stage(sub, "export", cmd_export, "fold models as ONNX, checked against torch on OOF images", budget=True)
    ex.add_argument("--onnx", action="store_true", help="write model.onnx (opset 17) for predict.engine: onnx")
    ex.add_argument("--parity-rows", type=_positive_int, default=512, help="OOF images per model checked (512)")
    _stage(sub, "ensemble", cmd_ensemble, "blend experiments (ENSEMBLE.yaml) -> runs/ and submissions/")
    z = sub.add_parser(
        "zoo",
        help="train every member of ZOO.yaml (a base config + per-member overrides) on one folds file",
        description="train every member of ZOO.yaml as its own experiment runs/<competition>/<zoo>-<member>/ "
        "(skipping finished ones), print their CV table, optionally blend them",
    )
    z.add_argument("config", help="zoo YAML: base, members, optional ensemble")
    z.add_argument("overrides", nargs="*", help="section.key=value overrides of the base (a member's own win)")
    z.add_argument(
        "--ensemble",
        metavar="METHOD",
        help="blend the members with this method (pipeline ensemble's; "
        "the zoo's ensemble: section gives the other keys)",
    )
    z.set_defaults(fn=cmd_zoo)


def _add_records(sub) -> None:
    """validate-submission, experiments, lb, run, status."""
    v = _stage(
        sub,
        "validate-submission",
        cmd_validate_submission,
        "check a submission file against the test data",
        budget=True,
    )
    v.add_argument("file", help="submission CSV")
    v.add_argument("--solution", help="CSV of the true answers in the submission's columns: also score the file")
    _stage(sub, "experiments", cmd_experiments, "list every run of the competition with CV and LB scores")
    lb = sub.add_parser(
        "lb",
        help="record the leaderboard score a submission file got",
        description="record the leaderboard score a submission file got",
    )
    lb.add_argument("submission")
    lb.add_argument("score", type=_finite, nargs="?")
    lb.add_argument("--fetch", action="store_true", help="read the score Kaggle gave it (after `pipeline submit`)")
    lb.add_argument("--competition", help="Kaggle competition slug (default: the one it was submitted to)")
    lb.set_defaults(fn=cmd_lb, overrides=[])
    what = "send a submission file the pipeline wrote to Kaggle (the kaggle package's API)"
    sm = sub.add_parser("submit", help=what, description=what)
    sm.add_argument("file", help="submission CSV (with its JSON beside it)")
    sm.add_argument("-m", "--message", required=True, help="the submission's description")
    sm.add_argument("--competition", help="Kaggle competition slug (default: the config's competition name)")
    sm.set_defaults(fn=cmd_submit, overrides=[])
    _stage(
        sub, "run", cmd_run, "fold, train, evaluate, predict and write a submission, skipping fresh stages", budget=True
    )
    _stage(sub, "status", cmd_status, "list the stages as done / stale / missing", budget=True)


def _place_file(args, extra: list[str]) -> None:
    """``validate-submission CFG key=v --budget 90s FILE``: argparse fills ``file`` with the last override
    before the option and leaves FILE over; the one bare word left over is the file, that override an
    override again (in its place, before the ones after the option)."""
    loose = [x for x in extra if not x.startswith("-") and "=" not in x]
    if getattr(args, "file", None) and "=" in args.file and len(loose) == 1:
        args.overrides = list(args.overrides) + [args.file]
        args.file = loose[0]
        extra.remove(loose[0])


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.logs import to_stdout

    to_stdout()
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        _place_file(args, extra)
        # Overrides may come after options (`train CFG --folds 0 train.lr=1e-3`).
        bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if extra:
        args.overrides = list(args.overrides) + extra
    t0 = time.time()
    try:
        _refuse_torchrun(args.command)
        args.fn(args)
    except PipelineError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a fault of the machine, not of the pipeline: the path and the cause
        print(f"error: {_one_line(describe_os_error(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line here, the traceback in a file for the report
        where = _save_traceback(args.command)
        msg = _one_line(str(e).strip().splitlines()[0]) if str(e).strip() else ""
        print(
            f"internal error: {type(e).__name__}{': ' + msg if msg else ''} (traceback saved to {where})",
            file=sys.stderr,
        )
        return 1
    if os.environ.get("PIPELINE_TIMING"):
        print(f"[{args.command}] {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


def _refuse_torchrun(command: str) -> None:
    """Under torchrun only ``train`` runs data-parallel; N copies of another stage would race for its files."""
    from pipeline.train.distributed import DistContext

    dist = DistContext.from_env()
    if dist.active and command != "train":
        raise PipelineError(
            f"torchrun: `pipeline {command}` runs in one process (WORLD_SIZE={dist.world_size}); "
            "only `pipeline train` trains data-parallel, run the other stages without torchrun"
        )


def _save_traceback(command: str) -> str:
    """Write the current exception's traceback under the cache's ``logs/`` (else the temp dir); its path."""
    import datetime as dt
    import tempfile
    import traceback
    from pathlib import Path

    from pipeline.core.io import cache_dir

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = f"pipeline {command} ({' '.join(sys.argv)})\n{traceback.format_exc()}"
    for root in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"pipeline-{command}-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return "nowhere: no writable log folder"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
