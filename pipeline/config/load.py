"""Reading a config: YAML with ``extends:``, command-line overrides, typed validation, the checks that
need no data, and the resolved snapshot each stage writes beside its outputs.

``load_config(path, overrides)`` returns a validated ``Config``; every problem (unknown key, wrong type,
missing value, a name no registry holds, a data format's own rules, a bad augmentation or search space,
missing data path) is one ``PipelineError`` line naming the file and the key. Everything that needs no
data is checked here, before any is read.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.config.registries import CHECKS
from pipeline.config.schema import Config, stage_sections
from pipeline.core.errors import PipelineError
from pipeline.core.keys import apply_overrides, known_keys, parse_yaml

MAX_YAML_BYTES = 4 * 2**20  # a config is a page of settings; a bigger file is the wrong file


def _read_yaml(path: Path) -> dict:
    """A config, ``--params`` or ensemble file as a mapping; anything else is one line naming it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # the name goes into run folders, snapshots and logs
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise PipelineError(f"{shown}: the path is not valid UTF-8; rename it") from None
    if path.is_dir():
        raise PipelineError(f"{path}: is a directory; expected a YAML file")
    if not path.exists():
        raise PipelineError(f"{path}: config file not found")
    if not path.is_file():
        raise PipelineError(f"{path}: not a regular file; expected a YAML file")
    with open(path, "rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise PipelineError(f"{path}: larger than {MAX_YAML_BYTES // 2**20} MiB; expected a YAML config")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PipelineError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); expected a YAML file in UTF-8"
        ) from None
    d = parse_yaml(text, str(path))
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level, got {type(d).__name__}")
    return d


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_with_extends(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve() if path.exists() else path
    if path in seen:
        raise PipelineError(f"{path}: extends: cycle ({' -> '.join(map(str, seen + (path,)))})")
    d = _read_yaml(path)
    parent = d.pop("extends", None)
    if parent is None:
        return d
    if not isinstance(parent, str):
        raise PipelineError(f"{path}: extends: expected a path to another YAML file, got {parent!r}")
    ppath = path.parent / parent
    if not ppath.exists():  # a directory or a non-UTF-8 file: _read_yaml names the problem
        raise PipelineError(f"{path}: extends: {parent} not found (looked at {ppath})")
    return deep_merge(_load_with_extends(ppath, seen + (path,)), d)


def _format_error(path: Path, err: ValidationError) -> str:
    """The first validation error as one line: ``<file>: <key>: <what is wrong> (got <value>)``."""
    errors = err.errors()
    e = errors[0]
    # a key as typed, unless it is not printable text (a newline in a key must not break the line);
    # without the branch tags pydantic adds for a union (``train.epochs.constrained-int``)
    loc = ".".join(
        p if isinstance(p, str) and p.isprintable() else str(p) if isinstance(p, int) else repr(p)
        for p in _key_path(e["loc"])
    )
    literal = next(
        (x for x in errors[1:] if x["type"] == "literal_error" and _key_path(x["loc"]) == _key_path(e["loc"])), None
    )
    if literal is not None and e["type"] != "literal_error":  # `int | Literal["auto"]`: say both
        e = {**e, "msg": f"{e['msg']}, or {literal['ctx']['expected']}"}
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, known_keys(Config), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"{path}: unknown key '{loc}'{hint}".replace("\n", "\\n")
    if e["type"] == "missing":
        return f"{path}: missing required key '{loc}'".replace("\n", "\\n")
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    # not repeated when the message already shows it ("'lion'; did you mean ...", "64; statoil_json ...")
    shown = (
        isinstance(got, (dict, list))
        or "got" in msg
        or (isinstance(got, str) and repr(got) in msg)
        or re.match(rf"{re.escape(str(got))}\b", msg)
    )
    got_r = repr(got)
    got_s = "" if shown else f" (got {got_r if len(got_r) <= 80 else got_r[:77] + '...'})"
    return f"{path}: {loc}: {msg}{got_s}".replace("\n", "\\n")


_UNION_TAG = re.compile(r"(constrained-)?(int|float|str|bool|none)$|.*\[")


def _key_path(loc: tuple) -> tuple:
    return tuple(p for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p)))


def load_config(path: str | Path, overrides: list[str] | dict | None = None, check_data: bool = True) -> Config:
    """Read a config file, apply ``extends`` and overrides, validate, check the data dir."""
    path = Path(path)
    d = _load_with_extends(path)
    if overrides:
        d = apply_overrides(d, overrides)
    if isinstance(d.get("members"), dict) and "base" in d:  # a zoo file (pipeline/zoo.py), not an experiment
        raise PipelineError(f"{path}: is a zoo file (base, members); use `pipeline zoo {path}`")
    for k in ("path", "name", "plan"):  # derived from the file (and the run), never set in it
        if k in d:
            hint = "; this looks like an ensemble file: use `pipeline ensemble`" if "members" in d else ""
            raise PipelineError(f"{path}: unknown key '{k}' (the experiment's name is the file's stem){hint}")
    try:
        cfg = Config.model_validate({**d, "path": str(path), "name": path.stem})
    except ValidationError as err:
        raise PipelineError(_format_error(path, err)) from None
    check_without_data(cfg)
    if check_data and not cfg.data_dir.is_dir():
        raise PipelineError(
            f"{path}: data.dir: {cfg.data.dir} does not exist (relative paths resolve against {Path.cwd()})"
        )
    if check_data:
        check_outputs_outside_data(cfg)
    return cfg


def check_outputs_outside_data(cfg: Config) -> None:
    """Nothing the pipeline writes (the folds file and its snapshot, runs, submissions) may land in
    ``data.dir``: a folds file named ``train.csv`` there would replace the labels."""
    data = cfg.data_dir.resolve()
    outputs = (
        ("folds.file" if cfg.folds.file else "paths.folds", cfg.folds_path),
        ("paths.runs", Path(cfg.paths.runs).expanduser()),
        ("paths.submissions", Path(cfg.paths.submissions).expanduser()),
    )
    for key, out in outputs:
        where = out.resolve()
        if where == data or data in where.parents:
            raise PipelineError(
                f"{cfg.path}: {key} puts {out} inside data.dir ({cfg.data.dir}); the pipeline never writes into "
                f"the data folder (it would overwrite the competition's files): set {key} outside it"
            )


def check_without_data(cfg: Config) -> None:
    """What the schema cannot check but needs no data either: the augmentation list (names and
    parameters; a dry run too where the format alone fixes the images' channels and size) and
    ``tune.space``, each problem one line as the stage that uses it would report it."""
    _no_nonfinite_text(cfg.augment, f"{cfg.path}: augment")
    _no_nonfinite_text(cfg.tune.space, f"{cfg.path}: tune.space")
    for name in CHECKS:  # the families' own checks (pipeline/config/registries.py), in order
        CHECKS.get(name)(cfg)


def _no_nonfinite_text(node, where: str) -> None:
    """Augment parameters and search-space values are free-form, and albumentations reads the text
    ``nan`` or ``1e999`` as a number: refused here as the schema refuses them in its typed keys."""
    if isinstance(node, dict):
        for k, v in node.items():
            _no_nonfinite_text(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _no_nonfinite_text(v, f"{where}[{i}]")
    elif isinstance(node, str):
        try:
            finite = math.isfinite(float(node))
        except ValueError:
            return
        if not finite:
            raise PipelineError(f"{where}: {node!r} is not a finite number; expected a finite number")


def write_snapshot(cfg: Config, yaml_path: Path, stage: str, resolved: dict | None = None) -> str:
    """Save the resolved config beside a stage's outputs (``yaml_path``) and its stage hash
    (``yaml_path`` with suffix ``.hash``); returns the stage hash. ``resolved`` maps keys whose
    value was decided at run time (``{"train.precision": "fp32"}`` for ``auto``) to that value:
    the snapshot shows it, the hash stays that of ``cfg`` (the config as the plan resolved it, pipeline/plan/)."""
    from pipeline.core.io import atomic_write_text

    h = cfg.hash(*stage_sections(cfg, stage))
    d, notes = cfg.to_dict(), []
    for key, value in (resolved or {}).items():
        section, name = key.split(".")
        notes.append(f"# {key}: {d[section][name]} resolved to {value}\n")
        d[section][name] = value
    text = (
        f"# resolved from {cfg.path}; config hash {cfg.hash()}; {stage} hash {h}\n"
        + "".join(notes)
        + yaml.safe_dump(d, sort_keys=False)
    )
    atomic_write_text(yaml_path, text)
    atomic_write_text(Path(yaml_path).with_suffix(".hash"), h + "\n")
    return h


def read_stage_hash(yaml_path: Path) -> str | None:
    p = Path(yaml_path).with_suffix(".hash")
    return p.read_text().strip() if p.is_file() else None
