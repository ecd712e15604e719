"""``tune.space``: the search space declared in the YAML, validated when loaded, sampled per trial.

Each key is a dotted config key; each value says how to sample it::

    tune:
      space:
        train.lr:           {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        train.epochs:       {type: int, low: 2, high: 8}                 # step: 2 -> 2, 4, 6, 8
        train.optimizer:    {type: categorical, choices: [adamw, sgd]}
        train.momentum:     {type: float, low: 0.8, high: 0.99, when: {train.optimizer: sgd}}
        model.backbone:     {type: categorical, choices: [tf_efficientnet_lite0, tf_efficientnet_lite1]}
        augment.Affine.rotate: {type: int, low: 0, high: 30}             # augment.<name>.<parameter>
        augment.0.p:        {type: float, low: 0.0, high: 1.0}           # augment.<index>.<parameter>

Augmentation parameters are addressed by the entry's transform ``name`` (``augment.Affine.rotate``)
or, when two entries share a name, by its position in the ``augment:`` list (``augment.3.rotate``).
The sampled value replaces the parameter; albumentations reads a single number as the symmetric
range for ``rotate``, ``translate_percent``, ``shear``...

``when`` makes a parameter conditional: it is sampled only when every listed key has the given value
(or one of a list of values). A condition key that is not searched is read from the config, so
pinning ``train.optimizer=adamw`` on the command line switches ``train.momentum`` off.

Keys that would make trials incomparable cannot be searched: the data, the folds, the metric and
the evaluation settings (use ``model.input_size`` instead of ``data.image_size``).

Every problem is one :class:`PipelineError` line naming the config file and ``tune.space.<key>``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from pipeline.core.errors import PipelineError
from pipeline.core.keys import apply_overrides, known_keys, lookup

if (
    TYPE_CHECKING
):  # the schema is type(cfg): the config checks tune.space when it loads, so this module cannot import it
    from pipeline.config.schema import Config

TYPES = ("float", "int", "categorical")
FIELDS = {"type", "low", "high", "log", "step", "choices", "when"}
# key prefix -> why it cannot be searched
FROZEN = {
    "competition": "it names the competition",
    "metric": "it is the objective itself",
    "data.": "every trial reads the same data (search model.input_size to change the size the model sees)",
    "folds.": "every trial must use the same folds",
    "evaluate.": "it changes how the objective is computed",
    "predict.": "prediction settings do not change the cross-validated objective",
    "tune.": "it configures the search itself",
    "train.seeds": "tune trains train.seed only (one model per fold)",
    "train.refit": "tune never refits on all rows",
    "train.device": "it does not change the result",
    "train.num_workers": "it does not change the result",
}


@dataclass(frozen=True)
class Param:
    """One searched key."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()
    augment_index: int | None = None  # for augment.<sel>.<param>: the entry's position
    augment_param: str | None = None

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def describe(self) -> str:
        if self.type == "categorical":
            s = "{" + ", ".join(map(str, self.choices)) + "}"
        else:
            s = (
                f"{self.type} [{self.low:g}, {self.high:g}]"
                + (" log" if self.log else "")
                + (f" step {self.step:g}" if self.step else "")
            )
        if self.when:
            s += " when " + ", ".join(f"{k} in {list(v)}" if len(v) > 1 else f"{k}={v[0]}" for k, v in self.when)
        return f"{self.key}: {s}"


@dataclass
class Space:
    params: list[Param]  # in sampling order: a parameter comes after the keys its ``when`` names
    pinned: dict[str, Any] = field(default_factory=dict)  # searched keys given on the command line -> value

    @property
    def conditional(self) -> bool:
        return any(p.when for p in self.params)

    @property
    def has_augment(self) -> bool:
        return any(p.augment_index is not None for p in self.params)

    def get(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)

    # -- per trial --
    def sample(self, trial, base: dict) -> dict[str, Any]:
        """Suggest every active parameter, in order; returns {key: value}."""
        values: dict[str, Any] = {}
        for p in self.params:
            if self.active(p, values, base):
                values[p.key] = p.suggest(trial)
        return values

    def active(self, p: Param, values: dict, base: dict) -> bool:
        for k, allowed in p.when:
            v = values[k] if k in values else _lookup(base, k, self)
            if v not in allowed:
                return False
        return True

    def apply(self, base: dict, values: dict[str, Any]) -> dict:
        """The config dict with ``values`` set (base is not modified)."""
        d = copy.deepcopy(base)
        for key, v in values.items():
            p = self.get(key)
            if p is not None and p.augment_index is not None:
                d["augment"][p.augment_index][p.augment_param] = v
            else:
                d = apply_overrides(d, {key: v})
        return d

    def overrides(self, base: dict, values: dict[str, Any]) -> dict[str, Any]:
        """``section.key: value`` overrides for ``pipeline train --params``. Augmentation values go
        in as the whole ``augment:`` list (an override replaces a list, it cannot index into one)."""
        out = {k: v for k, v in values.items() if self.get(k) is None or self.get(k).augment_index is None}
        if any(self.get(k) is not None and self.get(k).augment_index is not None for k in values):
            out["augment"] = self.apply(base, values)["augment"]
        return out


def _lookup(d: dict, key: str, space: Space | None = None):
    p = space.get(key) if space is not None else None
    if p is not None and p.augment_index is not None:
        return d["augment"][p.augment_index].get(p.augment_param)
    return lookup(d, key)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text_hint(v) -> str:
    """YAML 1.1 reads ``1e-4`` (no dot) as text: say so, and how to write the number."""
    try:
        return (
            f" (YAML reads {v} as text; write {float(v):.1e})"
            if isinstance(v, str) and "e" in v.lower() and math.isfinite(float(v))
            else ""
        )
    except ValueError:
        return ""


def _field_annotation(model: type[BaseModel], key: str):
    ann = None
    for part in key.split("."):
        f = model.model_fields.get(part)
        if f is None:
            return None
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return ann


def _int_only(ann) -> bool:
    """True when the config field holds integers (``int`` or ``int | None``)."""
    if ann is int:
        return True
    if typing.get_origin(ann) is typing.Annotated:  # Annotated[int, Field(ge=1)]
        return _int_only(typing.get_args(ann)[0])
    if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union:
        # int | None, or int | Literal["auto"]: the numbers it holds are integers
        args = [a for a in typing.get_args(ann) if a is not type(None) and typing.get_origin(a) is not typing.Literal]
        return len(args) == 1 and _int_only(args[0])
    return False


def parse_space(cfg: Config, pinned: Iterable[str] = ()) -> Space:
    """Validate ``cfg.tune.space`` (structure and values) and drop the keys pinned on the command line."""
    path = cfg.path or "config"
    raw = cfg.tune.space or {}
    base = cfg.to_dict()
    schema = type(cfg)
    pinned = [p for p in pinned if p]

    def err(key: str, msg: str) -> PipelineError:
        return PipelineError(f"{path}: tune.space.{key}: {msg}".replace("\n", " "))

    known = known_keys(schema)
    params: dict[str, Param] = {}
    dropped: dict[str, Any] = {}
    for key, spec in raw.items():
        key = str(key)
        if not isinstance(spec, dict):
            raise err(key, f"expected a mapping like {{type: float, low: 0.0001, high: 0.01, log: true}}, got {spec!r}")
        extra = sorted(set(spec) - FIELDS)
        if extra:
            close = difflib.get_close_matches(extra[0], FIELDS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"expected only {', '.join(sorted(FIELDS))}"
            raise err(key, f"unknown field {extra[0]!r}; {hint}")
        aug_index, aug_param = _check_key(key, known, cfg, err)
        typ = spec.get("type")
        if typ is None and "choices" in spec:
            typ = "categorical"
        if typ not in TYPES:
            raise err(key, f"unknown type {typ!r}; expected one of {', '.join(TYPES)}")
        p = _parse_one(key, typ, spec, err, aug_index, aug_param)
        if aug_index is None:
            _check_values(p, base, err, schema)
        if any(key == k or key.startswith(k + ".") for k in pinned):
            dropped[key] = _lookup(base, key, Space([p]))
            continue
        params[key] = p

    # conditions: each names a searched key (sampled first) or a plain config key (read from the config)
    for p in params.values():
        for k, allowed in p.when:
            if k == p.key:
                raise err(p.key, "when: a parameter cannot depend on itself")
            q = params.get(k)
            if q is None and k not in dropped and k not in known:
                close = difflib.get_close_matches(k, list(params) + known, n=1)
                raise err(p.key, f"when: unknown key {k!r}" + (f"; did you mean {close[0]}?" if close else ""))
            if q is not None and q.type == "categorical" and not any(a in q.choices for a in allowed):
                raise err(p.key, f"when: {k} never takes {list(allowed)!r}; its choices are {list(q.choices)!r}")
    return Space(_ordered(params, err), dropped)


def _check_key(key: str, known: list[str], cfg: Config, err) -> tuple[int | None, str | None]:
    parts = key.split(".")
    if parts[0] == "augment":
        if len(parts) != 3 or not all(parts):
            raise err(key, "expected augment.<transform name or index>.<parameter>, e.g. augment.Affine.rotate")
        sel, param = parts[1], parts[2]
        names = [e.get("name") if isinstance(e, dict) else None for e in cfg.augment]
        if sel.lstrip("-").isdigit():
            i = int(sel)
            if not 0 <= i < len(names):
                raise err(key, f"no augment entry {i}; the config's augment list has {len(names)} entries")
            return i, param
        hits = [i for i, n in enumerate(names) if n == sel]
        if not hits:
            listed = ", ".join(f"{i}: {n}" for i, n in enumerate(names)) or "no entries"
            raise err(key, f"no augment entry named {sel!r}; the config's augment list has {listed}")
        if len(hits) > 1:
            raise err(
                key,
                f"{len(hits)} augment entries are named {sel!r} (positions {', '.join(map(str, hits))}); "
                f"use augment.<position>.{param}",
            )
        return hits[0], param
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise err(key, f"not a config key{hint}")
    for prefix, why in FROZEN.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            raise err(key, f"cannot be searched: {why}")
    return None, None


def _parse_one(key: str, typ: str, spec: dict, err, aug_index, aug_param) -> Param:
    when = _parse_when(key, spec.get("when"), err)
    if typ == "categorical":
        for f in ("low", "high", "log", "step"):
            if f in spec:
                raise err(key, f"{f!r} does not apply to a categorical; expected choices: [...]")
        choices = spec.get("choices")
        if not isinstance(choices, list):
            raise err(key, f"choices: expected a list of values, got {choices!r}")
        if not choices:
            raise err(key, "choices: empty; expected at least one value")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise err(key, f"choices: {c!r} is not a single value; expected numbers, strings, booleans or null")
        if len(set(map(repr, choices))) != len(choices):
            raise err(key, f"choices: {choices!r} repeats a value")
        return Param(key, typ, choices=tuple(choices), when=when, augment_index=aug_index, augment_param=aug_param)
    if "choices" in spec:
        raise err(key, f"choices do not apply to type {typ}; use type: categorical")
    for f in ("low", "high"):
        if f not in spec:
            raise err(key, f"missing {f!r}; expected {{type: {typ}, low: ..., high: ...}}")
        v = spec[f]
        if not _is_number(v) or (typ == "int" and not (isinstance(v, int) or float(v).is_integer())):
            raise err(key, f"{f}: expected {'an integer' if typ == 'int' else 'a number'}, got {v!r}{_text_hint(v)}")
    low, high = spec["low"], spec["high"]
    if typ == "int":
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    if low > high:
        raise err(key, f"low {low:g} > high {high:g}; expected low <= high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise err(key, f"log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise err(key, f"log range needs low > 0, got low {low:g}")
    step = spec.get("step")
    if step is not None:
        if log:
            raise err(key, "step and log: true cannot be combined")
        if not _is_number(step) or step <= 0 or (typ == "int" and not float(step).is_integer()):
            raise err(key, f"step: expected a positive {'integer' if typ == 'int' else 'number'}, got {step!r}")
        step = int(step) if typ == "int" else float(step)
    return Param(key, typ, low, high, log, step, when=when, augment_index=aug_index, augment_param=aug_param)


def _parse_when(key: str, when, err) -> tuple[tuple[str, tuple], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise err(key, f"when: expected a mapping like {{train.optimizer: sgd}}, got {when!r}")
    out = []
    for k, v in when.items():
        allowed = tuple(v) if isinstance(v, list) else (v,)
        if not allowed:
            raise err(key, f"when: {k}: empty list; expected a value or a list of values")
        out.append((str(k), allowed))
    return tuple(out)


def _check_values(p: Param, base: dict, err, schema: type[BaseModel]) -> None:
    """Every bound and choice must be a value the config accepts (augment values: ``check_augment``)."""
    ann = _field_annotation(schema, p.key)
    if p.type == "float" and _int_only(ann):
        raise err(p.key, "the config key holds integers; use type: int")
    candidates = [("choice", c) for c in p.choices] if p.type == "categorical" else [("low", p.low), ("high", p.high)]
    for what, v in candidates:
        try:
            schema(**apply_overrides(base, {p.key: v}), path="", name="")
        except ValidationError as e:
            first = e.errors()[0]
            raise err(
                p.key, f"{what} {v!r} is not a valid value: {first['msg'].removeprefix('Value error, ')}"
            ) from None


def check_augment(space: Space, cfg: Config, value_range=None, channels: int | None = None, image_size=None) -> None:
    """Build the augmentation with each bound/choice of every searched augment parameter: a value
    albumentations refuses fails now, naming the key, not in the middle of a trial. What the images
    are not known yet (the config's check, before any data is read) is left out (``validate_augment``)."""
    from pipeline.data.augment import validate_augment

    base = cfg.to_dict()
    path = cfg.path or "config"
    for p in space.params:
        if p.augment_index is None:
            continue
        candidates = (
            [("choice", c) for c in p.choices] if p.type == "categorical" else [("low", p.low), ("high", p.high)]
        )
        for what, v in candidates:
            d = space.apply(base, {p.key: v})
            try:
                validate_augment(d["augment"], value_range, channels, image_size)
            except PipelineError as e:
                raise PipelineError(f"{path}: tune.space.{p.key}: {what} {v!r} is not valid: {e}") from None


def _ordered(params: dict[str, Param], err) -> list[Param]:
    """Declared order, except that a parameter follows the searched keys its ``when`` names."""
    out: list[Param] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(key: str, chain: tuple[str, ...]):
        if state.get(key) == 2:
            return
        if state.get(key) == 1:
            raise err(key, f"when: conditions form a cycle ({' -> '.join(chain + (key,))})")
        state[key] = 1
        for k, _ in params[key].when:
            if k in params:
                visit(k, chain + (key,))
        state[key] = 2
        out.append(params[key])

    for key in params:
        visit(key, ())
    return out


def trial_seed(seed: int, number: int) -> int:
    """A 32-bit seed per (tune.seed, trial number)."""
    return int.from_bytes(hashlib.sha256(f"tune|{seed}|{number}".encode()).digest()[:4], "little")


def check_config(cfg: Config) -> None:
    """``load_config``'s check of ``tune.space`` (pipeline/config/registries.py ``CHECKS``): its grammar,
    its keys, and the augmentation parameters it searches."""
    if cfg.tune.space:
        check_augment(parse_space(cfg), cfg, *cfg.data.image_spec())
