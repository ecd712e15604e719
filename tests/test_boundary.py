"""Numbers and files are checked at the boundary, by class: every float key of the schema (a
format's options included) refuses nan/inf, every number key refuses true/false, every YAML file
(config, ``extends:`` parent, ``--params``, ensemble) refuses duplicate keys, non-UTF-8 bytes,
alias bombs and exotic tags, and Statoil records refuse what is not a plain value of its kind.
Each is one line, exit 2, and nothing written. Bounded property tests: ``HYPOTHESIS_PROFILE=slow``
runs more examples."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli_error, write_yaml
from helpers import _bad_statoil, _set
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.load import load_config
from pipeline.config.options import Section, _leaf_types
from pipeline.config.registries import FORMATS
from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError
from pipeline.data.formats import options_model, read_table


@pytest.fixture
def base(tmp_path):
    (tmp_path / "data").mkdir()
    return write_yaml(
        tmp_path / "base.yaml", {"competition": "iceberg", "data": {"format": "statoil_json", "dir": "data"}}
    )


def _files(root: Path) -> set:
    return {p for p in root.rglob("*")}


def refused(capsys, root: Path, *argv) -> str:
    """cli_error (exit 2, one stderr line) and no file or folder created under ``root``."""
    before = _files(root)
    err = cli_error(capsys, *argv)
    assert _files(root) == before, sorted(map(str, _files(root) - before))
    return err


# ---- numbers in the schema, by class ---------------------------------------------------------


def _fields(model, prefix=""):
    """(dotted key, annotation) of every leaf field of a schema, nested sections expanded."""
    for name, f in model.model_fields.items():
        if name in ("path", "name"):
            continue
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Section) and name != "data":
            yield from _fields(ann, f"{prefix}{name}.")
        elif name != "data":
            yield prefix + name, ann


def _number_keys(kind):
    keys = [(k, ann) for k, ann in _fields(Config) if kind in _leaf_types(ann) and bool not in _leaf_types(ann)]
    for fmt in FORMATS:
        keys += [(f"data.{k}", ann) for k, ann in _fields(options_model(fmt)) if kind in _leaf_types(ann)]
    return keys


def _as_value(ann, x: str) -> str:
    """``x`` as the value of a key of annotation ``ann`` (a list/tuple key gets it as its last item)."""
    from typing import get_args, get_origin

    args = [a for a in get_args(ann) if a is not type(None)]
    seq = next((a for a in args if get_origin(a) in (list, tuple)), ann if get_origin(ann) in (list, tuple) else None)
    if seq is None:
        return x
    n = len([a for a in get_args(seq) if a is not Ellipsis]) if get_origin(seq) is tuple else 1
    return "[" + ", ".join(["0.5"] * (n - 1) + [x]) + "]"


FLOAT_KEYS = _number_keys(float)
INT_KEYS = _number_keys(int)


def test_the_class_is_not_empty():
    keys = [k for k, _ in FLOAT_KEYS]
    for k in ("train.lr", "model.drop_rate", "evaluate.eps", "predict.clip", "tune.p_threshold", "train.time_budget_s"):
        assert k in keys
    assert "train.epochs" in [k for k, _ in INT_KEYS] and "train.seeds" in [k for k, _ in INT_KEYS]


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "nan", "inf", "-inf", "1e999", "'NaN'", "1.0e+999"])
def test_every_float_key_refuses_non_finite(base, text):
    for key, ann in FLOAT_KEYS:
        with pytest.raises(PipelineError) as e:
            load_config(base, [f"{key}={_as_value(ann, text)}"])
        msg = str(e.value)
        assert "\n" not in msg and "finite" in msg, (key, msg)
        assert key in msg, (key, msg)


def test_every_number_key_refuses_a_boolean(base):
    for key, ann in FLOAT_KEYS + INT_KEYS:
        for text in ("true", "false"):
            with pytest.raises(PipelineError, match=rf"{key}: got .*expected a number, not true/false") as e:
                load_config(base, [f"{key}={_as_value(ann, text)}"])
            assert "\n" not in str(e.value)


def test_a_boolean_key_takes_only_true_or_false(base):
    bool_keys = [k for k, ann in _fields(Config) if _leaf_types(ann) - {type(None)} == {bool}]
    assert "model.pretrained" in bool_keys and "train.refit" in bool_keys
    for key in bool_keys:
        for text in ("2", "1", "0.0", "'yes'"):
            with pytest.raises(PipelineError, match=rf"{key}: got .*; expected true or false"):
                load_config(base, [f"{key}={text}"])
    assert load_config(base, ["model.pretrained=false", "train.refit=yes"]).train.refit is True  # YAML's own booleans


def test_integers_fractions_huge_and_seeds(base):
    cases = [
        ("train.epochs=2.5", r"train.epochs: Input should be a valid integer, got a number with a fractional part"),
        (
            f"train.epochs={10**30}",
            r"override 'train.epochs=1000.*out of range; expected an integer between -2\*\*63 and 2\*\*63-1",
        ),
        ("train.epochs=" + "9" * 5000, r"out of range"),  # beyond Python's int-from-text limit
        ("train.seed=-1", r"train.seed: Input should be greater than or equal to 0"),
        (f"train.seed={2**32}", r"train.seed: Input should be less than or equal to 4294967295"),
        ("train.seeds=[1, 1]", r"train.seeds: got \[1, 1\]; expected distinct seeds"),
        ("train.seeds=[1, -2]", r"train.seeds.1: Input should be greater than or equal to 0"),
        ("tune.seed=-5", r"tune.seed: Input should be greater than or equal to 0"),
        ("evaluate.n_bins=100000000", r"evaluate.n_bins: Input should be less than or equal to 10000"),
        ("tune.heartbeat_s=99999999999", r"tune.heartbeat_s: Input should be less than or equal to 86400"),
        ("train.num_workers=1000000", r"train.num_workers: Input should be less than or equal to 1024"),
    ]
    for override, message in cases:
        with pytest.raises(PipelineError, match=message):
            load_config(base, [override])
    with pytest.raises(PipelineError, match=r"folds: seed 4294967295 \+ repeats 2 - 1 exceeds 4294967295"):
        load_config(base, [f"folds.seed={2**32 - 1}", "folds.repeats=2"])
    cfg = load_config(base, ["train.epochs=3.0", "train.lr=3e-4", f"train.seed={2**32 - 1}", "train.seeds=[0, 7]"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(3e-4) and cfg.train.seeds == [0, 7]


def test_a_registered_formats_float_option_refuses_non_finite(base, request):
    from pipeline.config.options import DataOptions
    from pipeline.data.formats.base import Reader

    class GainOptions(DataOptions):
        gain: float = 1.0
        crops: list[float] = [0.5]

    class Gain(Reader):
        Options = GainOptions

    FORMATS.register("gain", Gain)
    request.addfinalizer(lambda: FORMATS.unregister("gain"))
    for override in ("data.gain=nan", "data.gain=1e999", "data.crops=[0.5, inf]", "data.gain=true"):
        with pytest.raises(PipelineError, match=r"data\.(gain|crops)"):
            load_config(base, ["data.format=gain", override])
    assert load_config(base, ["data.format=gain", "data.gain=2e-1"]).data.gain == pytest.approx(0.2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("augment=[{name: Rotate, limit: nan}]", r"augment\[0\].limit: 'nan' is not a finite number"),
        ("augment=[{name: Affine, scale: [0.9, '1e999']}]", r"augment\[0\].scale\[1\]: '1e999' is not a finite number"),
        ("augment=[{name: Rotate, limit: .inf}]", r"override 'augment=.*': .inf is not a finite number"),
        (
            "tune.space={train.lr: {type: float, low: 1.0e-4, high: inf}}",
            r"tune.space.train.lr.high: 'inf' is not a finite number",
        ),
        (
            "tune.space={train.lr: {type: float, low: 1e-4, high: 1.0e-2}}",
            r"low: expected a number, got '1e-4' \(YAML reads 1e-4 as text; write 1.0e-04\)",
        ),
    ],
)
def test_free_form_sections_refuse_non_finite_text(base, override, message):
    with pytest.raises(PipelineError, match=message):
        load_config(base, [override])


# ---- YAML files: config, extends parent, --params, ensemble ----------------------------------

GOOD = "competition: iceberg\ndata: {format: statoil_json, dir: data}\n"
BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else 'x'}]\n" for i in range(7))


@pytest.mark.parametrize(
    "content, message",
    [
        (
            GOOD + "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n",
            r"c.yaml:6: duplicate key 'lr' \(first at line 4\); expected each key once",
        ),
        (GOOD + "competition: other\n", r"c.yaml:3: duplicate key 'competition' \(first at line 1\)"),
        (GOOD + "augment:\n  - {name: Affine, p: 0.5, p: 1.0}\n", r"c.yaml:4: duplicate key 'p'"),
        (GOOD + "train: {lr: .inf}\n", r"c.yaml:3: .inf is not a finite number; expected a finite number"),
        (GOOD + "predict: {clip: [0.01, .NaN]}\n", r"c.yaml:3: .NaN is not a finite number"),
        (GOOD + f"train: {{epochs: {10**20}}}\n", r"c.yaml:3: integer 10{20} is out of range"),
        (
            GOOD.encode() + b"model: {backbone: caf\xe9}\n",
            r"c.yaml:3: not UTF-8 text \(byte 0xe9\); expected a YAML file in UTF-8",
        ),
        ("\ufeff".encode("utf-16") + GOOD.encode("utf-16")[2:], r"c.yaml:1: not UTF-8 text \(byte 0xff\)"),
        (bytes(range(256)) * 4, r"c.yaml:\d+: not UTF-8 text"),
        (GOOD + 'model: {backbone: "a\\0b"}\n', r"c.yaml:3: a text value holds a NUL character"),
        (GOOD + "model: {backbone: !!binary aGVsbG8=}\n", r"c.yaml:3: tag !!binary is not allowed in a config"),
        (GOOD + "train: !!set {a, b}\n", r"c.yaml:3: tag !!set is not allowed"),
        (GOOD + "train: !!python/object:os.system {}\n", r"c.yaml:3: tag !!python/object:os.system is not allowed"),
        (GOOD + "x: !custom 1\n", r"c.yaml:3: tag '?!custom'? is not allowed"),
        (GOOD + BOMB, r"c.yaml:\d+: the document expands to more than 100000 values \(YAML aliases\?\)"),
        (GOOD + "loop: &a [*a]\n", r"c.yaml:3: an alias refers to the value that contains it"),
        (
            GOOD + "tune: {space: " + "{a: " * 40 + "1" + "}" * 41 + "\n",
            r"c.yaml:3: values nested more than 32 levels deep",
        ),
        (
            GOOD + "".join(f"l{i}: &l{i} [*l{i - 1}]\n" if i else "l0: &l0 [x]\n" for i in range(40)),
            r"c.yaml:\d+: values nested more than 32",
        ),
        (GOOD + "deep: " + "[" * 5000 + "]" * 5000 + "\n", r"c.yaml: the document is nested too deeply"),
        (
            GOOD + "data:\n\tformat: x\n",
            r"c.yaml:4: invalid YAML \(found character '\\t' that cannot start any token\)",
        ),
        (
            GOOD + "bad: \x07\n",
            r"c.yaml: invalid YAML \(unacceptable character #x0007: special characters are not allowed\)",
        ),
        ("- competition\n- data\n", r"c.yaml: expected a mapping of sections at the top level, got list"),
        ("just text\n", r"c.yaml: expected a mapping of sections at the top level, got str"),
        ("", r"c.yaml: missing required key 'competition'"),
        ("a: 1\n---\nb: 2\n", r"c.yaml:2: invalid YAML \(but found another document\)"),
        (GOOD + "1: 2\n", r"c.yaml: 1: Keys should be strings \(got 1\)"),
        (b"x" * (4 * 2**20 + 1), r"c.yaml: larger than 4 MiB; expected a YAML config"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "data").mkdir()
    p = tmp_path / "c.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = refused(capsys, tmp_path, "fold", p)
    assert re.search(message, err), err


def test_merge_keys_may_be_overridden_and_dates_stay_text(tmp_path):
    (tmp_path / "2024-01-01").mkdir()
    p = tmp_path / "m.yaml"
    p.write_text(
        f"competition: iceberg\ndata: {{format: statoil_json, dir: {tmp_path / '2024-01-01'}}}\n"
        "model: &m {backbone: resnet18, drop_rate: 0.1}\n"
        "train: {<<: {lr: 0.1, epochs: 2}, lr: 0.2}\n"
    )
    cfg = load_config(p)
    assert cfg.train.lr == 0.2 and cfg.train.epochs == 2  # a merged key is overridden, not a duplicate
    cfg = load_config(p, ["data.dir=2024-01-01"], check_data=False)
    assert cfg.data.dir == "2024-01-01"  # a date-shaped value is the folder name it was written as


def test_paths_that_are_not_config_files(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert (
        refused(capsys, tmp_path, "fold", tmp_path / "data")
        == f"error: {tmp_path / 'data'}: is a directory; expected a YAML file"
    )
    assert refused(capsys, tmp_path, "fold", tmp_path / "nope.yaml").endswith("nope.yaml: config file not found")
    os.mkfifo(tmp_path / "fifo.yaml")
    assert refused(capsys, tmp_path, "fold", tmp_path / "fifo.yaml").endswith(
        "fifo.yaml: not a regular file; expected a YAML file"
    )
    bad_name = str(tmp_path) + "/caf\udce9.yaml"  # argv bytes that are not UTF-8
    with open(os.fsencode(bad_name), "w") as f:
        f.write(GOOD)
    assert "the path is not valid UTF-8; rename it" in refused(capsys, tmp_path, "fold", bad_name)


def test_extends_a_bad_parent_names_the_parent(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    child = tmp_path / "child.yaml"
    for parent, message in [
        (b"competition: a\ncompetition: b\n", r"parent.yaml:2: duplicate key 'competition'"),
        (b"competition: \xff\n", r"parent.yaml:1: not UTF-8 text \(byte 0xff\)"),
        (b"train: {lr: -.inf}\n", r"parent.yaml:1: -.inf is not a finite number"),
    ]:
        (tmp_path / "parent.yaml").write_bytes(parent)
        child.write_text("extends: parent.yaml\n" + GOOD)
        err = refused(capsys, tmp_path, "fold", child)
        assert re.search(message, err), err
    (tmp_path / "parent.yaml").unlink()
    (tmp_path / "parent.yaml").mkdir()
    assert refused(capsys, tmp_path, "fold", child).endswith("parent.yaml: is a directory; expected a YAML file")


@pytest.mark.parametrize(
    "content, message",
    [
        ("train.lr: 0.1\ntrain.lr: 0.2\n", r"p.yaml:2: duplicate key 'train.lr' \(first at line 1\)"),
        ("train.lr: .inf\n", r"p.yaml:1: .inf is not a finite number"),
        (b"train.lr: 0.1 # \xff\n", r"p.yaml:1: not UTF-8 text \(byte 0xff\)"),
        ("- train.lr\n", r"p.yaml: expected a mapping of sections at the top level, got list"),
        (
            "train: {lr: 0.1}\n",
            r"p.yaml: train: a whole section; expected section.key: value lines like train.lr: \.\.\.",
        ),
        ("1: 2\n", r"p.yaml: key 1 is not a dotted config key"),
        ("'train.lr=0.1': 1\n", r"p.yaml: key 'train.lr=0.1' is not a dotted config key"),
        ("train.lr: true\n", r"base.yaml: train.lr: got True; expected a number, not true/false"),
    ],
)
def test_bad_params_file_is_one_line(base, tmp_path, capsys, content, message):
    p = tmp_path / "p.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = refused(capsys, tmp_path, "train", base, "--params", p)
    assert re.search(message, err), err


def test_params_path_that_is_not_a_file(base, tmp_path, capsys):
    assert refused(capsys, tmp_path, "predict", base, "--params", tmp_path / "data").endswith(
        "data: is a directory; expected a YAML file"
    )
    assert refused(capsys, tmp_path, "train", base, "--params", tmp_path / "no.yaml").endswith(
        "no.yaml: config file not found"
    )


def test_ensemble_file_goes_through_the_same_reader(tmp_path, capsys):
    blend = tmp_path / "blend.yaml"
    blend.write_text("competition: c\nconfig: base.yaml\nmembers: [a, b]\nmethod: mean\nmethod: stack\n")
    assert refused(capsys, tmp_path, "ensemble", blend).endswith(
        "blend.yaml:5: duplicate key 'method' (first at line 4); expected each key once in a mapping"
    )
    blend.write_text("competition: c\nconfig: base.yaml\nmembers: [a, b]\nclip: [0.01, .inf]\n")
    assert refused(capsys, tmp_path, "ensemble", blend).endswith(
        "blend.yaml:4: .inf is not a finite number; expected a finite number"
    )
    blend.write_text("competition: c\nconfig: base.yaml\nmembers: [a, b]\n")
    assert "override 'stack_c=.nan': .nan is not a finite number" in refused(
        capsys, tmp_path, "ensemble", blend, "stack_c=.nan"
    )


# ---- command-line overrides ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("nosection.key=1", r"base.yaml: unknown key 'nosection'"),
        ("train.lr=", r"base.yaml: train.lr: got None; expected auto or a number > 0"),
        ("competition=", r"base.yaml: competition: Input should be a valid string"),
        ("train.lr={a: 1}", r"base.yaml: train.lr: got \{'a': 1\}; expected auto or a number > 0"),
        ("train.lr=automatic", r"base.yaml: train.lr: got 'automatic'; expected auto or a number > 0"),
        ("train.lr=-0.1", r"base.yaml: train.lr: Input should be greater than 0; expected auto or a number > 0"),
        ("train.device=[cpu]", r"base.yaml: train.device: Input should be a valid string"),
        ("train=3", r"base.yaml: train: Input should be a valid dictionary"),
        ("train. =1", r"override 'train. =1' has an empty key"),
        (
            "data.dir=caf\udce9",
            r"override 'data.dir=caf\\udce9' is not valid UTF-8 text; expected section.key=value in UTF-8",
        ),
        ("train.lr=.inf", r"override 'train.lr=.inf': .inf is not a finite number"),
        ("train={lr: 1, lr: 2}", r"override 'train=\{lr: 1, lr: 2\}': duplicate key 'lr'"),
        ("augment=" + BOMB.replace("\n", ", ").join("{}"), r"the document expands to more than 100000 values"),
        ("train.lr=!!python/name:os.system", r"tag !!python/name:os.system is not allowed"),
    ],
)
def test_bad_override_is_one_line(base, tmp_path, capsys, override, message):
    err = refused(capsys, tmp_path, "fold", base, override)
    assert re.search(message, err), err


# ---- Statoil records -------------------------------------------------------------------------

_statoil = _bad_statoil  # a copy of the demo data with one record changed


def _band_item(i, key, j, value):
    def mutate(recs):
        recs[i][key][j] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            _set(1, "inc_angle", -0.5),
            r"train.json: id '\w+': inc_angle is -0.5; expected degrees between 0 and 90, or \"na\"",
        ),
        (_set(1, "inc_angle", 90.01), r"inc_angle is 90.01; expected degrees between 0 and 90"),
        (_set(1, "inc_angle", 1e308), r"inc_angle is 1e\+308; expected degrees between 0 and 90"),
        (_set(1, "inc_angle", 10**400), r"inc_angle is 1(0){36}\.\.\.; expected a finite number"),
        (_set(1, "inc_angle", float("nan")), r"inc_angle is nan; expected a finite number or \"na\""),
        (_set(1, "inc_angle", True), r"inc_angle is True; expected a number or \"na\""),
        (_set(1, "inc_angle", "43.5"), r"inc_angle is '43.5'; expected a number or \"na\""),
        (_set(1, "inc_angle", "NaN"), r"inc_angle is 'NaN'; expected a number or \"na\""),
        (_set(1, "inc_angle", [40]), r"inc_angle is \[40\]; expected a number or \"na\""),
        (_set(2, "id", ""), r"train.json: record 2: id '' is blank; expected a non-empty string"),
        (_set(2, "id", "   "), r"train.json: record 2: id '   ' is blank"),
        (_set(2, "id", 17), r"train.json: record 2: id is 17 \(int\); expected a string"),
        (_set(2, "id", ["a"]), r"train.json: record 2: id is \['a'\] \(list\); expected a string"),
        (_set(2, "id", None), r"train.json: record 2: missing 'id'"),
        (_set(2, "id", "a\nb"), r"train.json: record 2: id 'a\\nb' holds a control character"),
        (_set(3, "is_iceberg", 0.5), r"is_iceberg is 0.5; expected 0 or 1"),
        (_set(3, "is_iceberg", True), r"is_iceberg is True; expected 0 or 1"),
        (_set(3, "is_iceberg", "1"), r"is_iceberg is '1'; expected 0 or 1"),
        (_set(3, "is_iceberg", None), r"is_iceberg is None; expected 0 or 1"),
        (_band_item(4, "band_1", 9, True), r"id '\w+': band_1 has non-numeric values \(e.g. True\)"),
        (_band_item(4, "band_2", 9, "-20.5"), r"band_2 has non-numeric values \(e.g. '-20.5'\)"),
        (_band_item(4, "band_1", 0, None), r"band_1 has non-numeric values \(e.g. None\)"),
        (_band_item(4, "band_1", 0, 10**400), r"band_1 has NaN or inf pixels"),
        (_band_item(4, "band_1", 0, 1e39), r"band_1 has NaN or inf pixels"),  # finite in JSON, inf in float32
        (_set(4, "band_1", [[v] for v in range(5625)]), r"band_1 has non-numeric values \(e.g. \[0\]\)"),
    ],
)
def test_statoil_bad_records(tmp_path, make_config, iceberg_dir, capsys, mutate, message):
    d = _statoil(tmp_path, iceberg_dir, mutate)
    err = refused(capsys, tmp_path, "fold", make_config(d, "statoil_json"))
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"id": "a", "id": "b"}]', r"train.json: a record gives key 'id' twice; expected each key once"),
        ("[" * 100_000 + "]" * 100_000, r"train.json: not readable as JSON \(RecursionError"),
        ("[" + "1" * 5000 + "]", r"train.json: not readable as JSON \(ValueError: Exceeds the limit"),
    ],
)
def test_statoil_bad_json(tmp_path, make_config, iceberg_dir, capsys, text, message):
    d = _statoil(tmp_path, iceberg_dir, lambda r: None)
    (d / "train.json").write_text(text)
    err = refused(capsys, tmp_path, "fold", make_config(d, "statoil_json"))
    assert re.search(message, err), err


def test_statoil_edges_that_are_accepted(tmp_path, make_config, iceberg_dir):
    def edges(recs):
        recs[0]["inc_angle"], recs[1]["inc_angle"], recs[2]["inc_angle"] = 0, 90, None
        recs[3]["is_iceberg"] = float(recs[3]["is_iceberg"])  # 1.0 is the integer 1
        recs[4]["band_1"] = [int(v) for v in recs[4]["band_1"]]

    d = _statoil(tmp_path, iceberg_dir, edges)
    t = read_table(load_config(make_config(d, "statoil_json")), "train")
    recs = json.loads((d / "train.json").read_text())
    assert (
        t.meta["inc_angle"].iloc[0] == 0
        and t.meta["inc_angle"].iloc[1] == 90
        and math.isnan(t.meta["inc_angle"].iloc[2])
    )
    assert t.labels[3] == int(recs[3]["is_iceberg"])
    np.testing.assert_array_equal(t.images[4, 0].ravel(), recs[4]["band_1"])


def test_any_format_refuses_blank_ids(tmp_path, make_config, request):
    from pipeline.data.formats.base import Reader
    from pipeline.data.table import Table

    class Rows(Reader):
        def _read(self, split):
            ids = np.array(["a", " ", "c"] if split == "train" else ["a", None, "c"], dtype=object)
            return Table(
                ids=ids, images=np.zeros((3, 1, 4, 4), np.float32), class_names=["x", "y"], labels=np.array([0, 1, 0])
            )

    FORMATS.register("rows", Rows)
    request.addfinalizer(lambda: FORMATS.unregister("rows"))
    (tmp_path / "rows").mkdir()
    cfg = load_config(make_config(tmp_path / "rows", "rows"))
    with pytest.raises(
        PipelineError, match=r"rows: row 1 has an empty id \(' '\); expected a non-empty id in every row"
    ):
        read_table(cfg, "train")
    with pytest.raises(PipelineError, match=r"row 1 has an empty id \((None|nan)\)"):
        read_table(cfg, "test")


@pytest.mark.parametrize(
    "label, message",
    [
        ("1e20", r"train.csv: row 4 has label 1e\+20; expected an integer class"),
        ("inf", r"train.csv: row 4 has label inf; expected an integer class"),
        ("2.5", r"train.csv: row 4 has label 2.5; expected an integer class"),
    ],
)
def test_pixel_csv_labels_are_integers_an_int64_holds(tmp_path, make_config, digits_dir, capsys, label, message):
    import pandas as pd

    d = tmp_path / "px"
    shutil.copytree(digits_dir, d)
    df = pd.read_csv(d / "train.csv", dtype=str)
    df.loc[3, "label"] = label
    df.to_csv(d / "train.csv", index=False)
    err = refused(capsys, tmp_path, "fold", make_config(d, "pixel_csv"))
    assert re.search(message, err), err
    df["label"] = np.where(np.arange(len(df)) % 2, "True", "False")  # a true/false column is not a class number
    df.to_csv(d / "train.csv", index=False)
    assert re.search(
        r"train.csv: row 1 has label False; expected an integer class",
        refused(capsys, tmp_path, "fold", make_config(d, "pixel_csv")),
    )


# ---- properties: whatever the document or the override, a Config or one line ------------------

SECTIONS = [
    "competition",
    "metric",
    "data",
    "folds",
    "model",
    "train",
    "augment",
    "evaluate",
    "predict",
    "tune",
    "paths",
    "extends",
]
KEY_PARTS = SECTIONS + sorted(
    {k.split(".")[-1] for k, _ in _fields(Config)} | {"format", "dir", "image_size", "channels", "name", "p"}
)
ODD_TEXT = [
    "nan",
    "inf",
    "-inf",
    "1e999",
    "3e-4",
    ".inf",
    "true",
    "na",
    "",
    " ",
    "cuda:1",
    "2001-01-01",
    "Rotate",
    "HorizontalFlip",
    "statoil_json",
    "pixel_csv",
    "adam",
    "data",
    "~",
    "../x",
    "1_000",
    "0x1f",
    "1:30",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 100),
    st.integers(-(2**70), 2**70),
    st.floats(-2, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_TEXT + ["a\x00b", "x\ny"]),
    st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(KEY_PARTS) | SCALARS, c, max_size=4),
    max_leaves=12,
)
AUGMENT = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["HorizontalFlip", "Rotate", "Affine", "GaussNoise", "Blurr", "CoarseDropout"])},
        optional={"p": VALUES, "limit": VALUES, "scale": VALUES, "rotate": VALUES, "std_range": VALUES},
    ),
    max_size=3,
)
SPACE = st.dictionaries(
    st.sampled_from(
        ["train.lr", "train.epochs", "train.optimizer", "model.drop_rate", "augment.0.p", "augment.Rotate.limit"]
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["float", "int", "categorical", "x"])},
        optional={"low": VALUES, "high": VALUES, "step": VALUES, "log": VALUES, "choices": VALUES, "when": VALUES},
    ),
    max_size=2,
)
DOCS = st.dictionaries(
    st.sampled_from(SECTIONS), VALUES | st.dictionaries(st.sampled_from(KEY_PARTS), VALUES, max_size=5), max_size=6
) | st.fixed_dictionaries({}, optional={"augment": AUGMENT, "tune": st.fixed_dictionaries({"space": SPACE})})


def _loads_or_one_line(path, overrides=()):
    try:
        cfg = load_config(path, list(overrides), check_data=False)
    except PipelineError as e:
        assert str(e) and "\n" not in str(e), str(e)
        return None
    json.dumps(cfg.to_dict(), allow_nan=False)  # every number a loaded config holds is finite
    return cfg


@given(doc=DOCS)
def test_random_documents_load_or_fail_in_one_line(tmp_path_factory, doc):
    d = tmp_path_factory.mktemp("doc")
    base = {"competition": "c", "data": {"format": "statoil_json", "dir": "data"}}
    for k, v in doc.items():  # over a valid base, so some documents get far into the schema
        base[k] = {**base[k], **v} if isinstance(base.get(k), dict) and isinstance(v, dict) else v
    try:
        text = yaml.safe_dump(base, allow_unicode=True)
    except yaml.YAMLError:
        return
    (d / "c.yaml").write_text(text, encoding="utf-8")
    (d / "p.yaml").write_text("competition: c\ndata: {format: statoil_json, dir: data}\n")
    _loads_or_one_line(d / "c.yaml")


@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.lists(
            st.sampled_from(
                [
                    "competition: c\n",
                    "data: {format: statoil_json, dir: data}\n",
                    "train:\n",
                    "  lr: 1\n",
                    "  lr: .inf\n",
                    "\tx: 1\n",
                    "- a\n",
                    "&a [1]\n",
                    "*a\n",
                    "extends: c.yaml\n",
                    "---\n",
                    "extends: p.yaml\n",
                    "x: !!binary aGk=\n",
                    "\xff",
                    "{",
                    "]",
                ]
            ),
            max_size=8,
        ).map(lambda ls: "".join(ls).encode("utf-8", "surrogateescape")),
    )
)
def test_random_bytes_load_or_fail_in_one_line(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("raw")
    (d / "c.yaml").write_bytes(raw)
    (d / "p.yaml").write_text("competition: p\ndata: {format: statoil_json, dir: data}\n")
    _loads_or_one_line(d / "c.yaml")


OVERRIDE_KEYS = st.sampled_from(
    [k for k, _ in _fields(Config)]
    + ["data.dir", "data.image_size", "data.format", "augment", "tune.space", "nosuch", "train", "train.lr.x", "", "."]
)


@given(
    key=OVERRIDE_KEYS | st.text(max_size=10),
    value=st.one_of(st.text(max_size=20), st.sampled_from(ODD_TEXT), VALUES.map(lambda v: _flow(v))),
    sep=st.sampled_from(["=", "", "=="]),
)
def test_random_overrides_load_or_fail_in_one_line(base, key, value, sep):
    _loads_or_one_line(base, [f"{key}{sep}{value}"])


def _flow(v) -> str:
    try:
        return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return "x"
