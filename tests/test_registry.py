"""The one Registry class: registering, listing, lazy entries imported on first look-up, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.registry import Registry, unknown_name

ROOT = Path(__file__).resolve().parents[1]


def test_register_list_get_and_unregister():
    reg = Registry("thing", entries={"a": 1})
    assert reg.register("b", 2) == 2

    @reg.register("c")
    def c():
        return 3

    assert reg.names() == ["a", "b", "c"] and list(reg) == ["a", "b", "c"] and len(reg) == 3
    assert reg.get("c") is c and "b" in reg and "z" not in reg and 1 not in reg
    reg.register("a", 10)  # replaced in place
    assert reg.names() == ["a", "b", "c"] and reg.get("a") == 10
    reg.unregister("b")
    assert reg.names() == ["a", "c"]
    with pytest.raises(ValueError, match=r"^unknown thing 'b'; expected one of a, c$"):
        reg.unregister("b")


def test_unknown_names_say_what_is_close_or_what_is_known():
    reg = Registry("optimizer", entries={"adamw": 1, "sgd": 2})
    with pytest.raises(ValueError, match=r"^unknown optimizer 'adam'; did you mean adamw\?$"):
        reg.get("adam")
    with pytest.raises(ValueError, match=r"^unknown optimizer 'lion'; expected one of adamw, sgd$"):
        reg.check("lion")
    assert reg.check("sgd") == "sgd"
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", 1)
    with pytest.raises(ValueError, match="'module:attr'"):
        reg.register_lazy("x", "no_colon")


def test_a_lazy_entry_is_imported_on_first_look_up_only():
    code = (
        "import sys\n"
        "from pipeline.core.registry import Registry\n"
        "reg = Registry('dump', lazy={'dumps': 'json.decoder:JSONDecoder', 'deep': 'os.path:join'})\n"
        "sys.modules.pop('json.decoder', None); sys.modules.pop('json', None)\n"
        "assert 'dumps' in reg and reg.names() == ['dumps', 'deep'] and 'json.decoder' not in sys.modules\n"
        "assert reg.lazy_paths() == {'dumps': 'json.decoder:JSONDecoder', 'deep': 'os.path:join'}\n"
        "assert reg.get('dumps').__name__ == 'JSONDecoder' and 'json.decoder' in sys.modules\n"
        "assert reg.lazy_paths() == {'deep': 'os.path:join'} and reg.names() == ['dumps', 'deep']\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_config_checks_names_without_importing_the_families():
    code = (
        "import sys\n"
        "from pipeline.config.registries import OPTIMIZERS, SAMPLERS, TASKS, TTA, FORMATS\n"
        "assert 'adamw' in OPTIMIZERS and 'tpe' in SAMPLERS and 'binary' in TASKS and 'dihedral' in TTA\n"
        "assert 'pixel_csv' in FORMATS\n"
        "bad = [m for m in ('pipeline.train.optim', 'pipeline.tune.samplers', 'pipeline.models.tta', "
        "'pipeline.tasks.classification', 'pipeline.data.formats.pixel_csv', 'torch', 'optuna') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12, unique=True), st.text(max_size=8))
def test_membership_and_messages_hold_for_any_names(names, probe):
    reg = Registry("name", entries={n: i for i, n in enumerate(names)})
    assert reg.names() == names
    if probe in names:
        assert reg.get(probe) == names.index(probe)
    else:
        with pytest.raises(ValueError) as e:
            reg.get(probe)
        assert str(e.value) == unknown_name("name", probe, names) == reg.unknown(probe)
