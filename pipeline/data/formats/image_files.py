"""Where an ``image_folder`` competition's images are: the files of a split folder, each id's file
(a file name, a stem, or a path under the split folder), the class-folder layout ``train/<class>/<file>``
and the containment rule: nothing outside the split folder is read, so no test image is trained on.

Hidden files and folders (a name starting with ".") and files without an image extension are not
images, in every listing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.core.errors import PipelineError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _files(folder: Path) -> dict[str, os.DirEntry]:
    """Files directly in ``folder`` by name."""
    return {e.name: e for e in os.scandir(folder) if e.is_file()} if folder.is_dir() else {}


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _image_files(folder: Path) -> dict[str, os.DirEntry]:
    """Files with an image extension (others, e.g. .DS_Store, are not listed as images)."""
    return {n: e for n, e in _files(folder).items() if _is_image(n)}


def _check_inside(folder: Path, name: str, entry: os.DirEntry | None, where: str) -> None:
    """A file the id resolves to must really be inside ``folder``: a link (or a linked sub-folder)
    pointing elsewhere, e.g. at the test images or outside the data, is refused. ``folder`` is
    resolved first, so a data root that is itself a link (Kaggle's /kaggle/input) works."""
    if entry is not None and not entry.is_symlink():
        return  # listed by scandir of the folder itself and no link: inside by construction (no syscall)
    real, root = os.path.realpath(folder / name), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise PipelineError(
            f"{where} resolves to {real}, outside {folder}; expected image files inside the data folder"
        )


def _visible(folder: Path | str) -> list[os.DirEntry]:
    """The entries of ``folder`` not hidden, by name (so the first culprit named is always the same)."""
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)


# ---- the class-folder layout: train/<class>/<file>, no train.csv ----


class Classes(NamedTuple):
    ids: list[str]  # "<class>/<file>", classes in order, files in natural order within each
    class_names: list[str]  # the folder names as text ("01" and "1" are two classes), sorted
    labels: np.ndarray  # each row's class index
    entries: dict[str, os.DirEntry]  # id -> its file


def has_class_folders(folder: Path) -> bool:
    """``folder`` holds a (visible) sub-folder: without train.csv, the class-folder layout."""
    return folder.is_dir() and any(e.is_dir() for e in _visible(folder))


def class_folders(folder: Path) -> Classes:
    """Every image of ``folder/<class>/``, refusing what would make a row or a class ambiguous: an image
    beside the class folders, a folder inside one, a class folder without images, a link leading out."""
    classes = [e for e in _visible(folder) if e.is_dir()]
    stray = next((e for e in _visible(folder) if e.is_file() and _is_image(e.name)), None)
    if stray is not None:
        some = ", ".join(f"{c.name}/" for c in classes[:3]) + (", ..." if len(classes) > 3 else "")
        raise PipelineError(
            f"{folder / stray.name}: an image file directly in {folder.name}/ beside the class folders {some}; "
            f"expected either only class folders ({folder.name}/<class>/<image>) "
            f"or {folder.name}.csv (id,label) listing the images"
        )
    ids, labels, entries = [], [], {}
    for k, c in enumerate(classes):
        _check_inside(folder, c.name, c, f"{folder / c.name}/ (class folder)")
        files = {}
        for e in _visible(c.path):
            if e.is_dir():
                raise PipelineError(
                    f"{folder / c.name / e.name}: a folder inside the class folder {c.name}/; "
                    f"expected image files directly in {folder.name}/<class>/ (one level of class folders)"
                )
            if e.is_file() and _is_image(e.name):
                files[e.name] = e
        if not files:
            raise PipelineError(
                f"{folder / c.name}: a class folder with no image files; "
                f"expected at least one image file (.png, .jpg, ...) in every class folder of {folder.name}/"
            )
        for name in sorted(files, key=lambda n: (_natural(n), n)):
            rid = f"{c.name}/{name}"
            _check_inside(folder, rid, files[name], f"{folder / rid}: id {rid!r}")
            ids.append(rid)
            labels.append(k)
            entries[rid] = files[name]
    return Classes(ids, [c.name for c in classes], np.asarray(labels, dtype=np.int64), entries)


def check_flat(folder: Path) -> None:
    """The test folder beside class folders is flat: images in a sub-folder of it would go unlisted."""
    for e in _visible(folder) if folder.is_dir() else []:
        if e.is_dir() and _image_files(Path(e.path)):
            raise PipelineError(
                f"{folder / e.name}: a sub-folder of images in {folder.name}/; expected the {folder.name} images "
                f"directly in {folder.name}/ (only train/ holds class folders) or {folder.name}.csv listing them"
            )


# ---- ids -> files ----


def _stems(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in _image_files(folder):
        out.setdefault(os.path.splitext(name)[0], []).append(name)
    return out


def _sub_stem(folder: Path, rid: str, where: str, stems: dict) -> list[str]:
    """The files whose stem an id is: ``abc`` for ``abc.png``, ``daisy/123`` for ``daisy/123.jpg`` (a path's
    folder checked to be inside first); ``stems`` caches each folder's listing ("" is ``folder`` itself)."""
    if "/" not in rid:
        return stems[""].get(rid, [])
    sub, stem = rid.rsplit("/", 1)
    if sub not in stems:
        _check_inside(folder, sub, None, where)  # never list a folder outside
        stems[sub] = _stems(folder / sub)
    return [f"{sub}/{n}" for n in stems[sub].get(stem, [])]


def resolve(ids: list[str], folder: Path, source: Path) -> tuple[list[str], dict[str, os.DirEntry]]:
    """Each id's file in ``folder`` (strings, not Paths: 25,000 Paths cost a second) and the files directly
    in it; ``source`` (the CSV, or the folder listed) is named in messages."""
    entries = _files(folder)
    by_stem = {"": _stems(folder)}
    exts = "|".join(e.lstrip(".") for e in IMAGE_EXTS[:3])
    names, seen = [], {}
    for row, i in enumerate(ids):
        where = f"{source}: row {row + 1}: id {i!r}" if source.suffix == ".csv" else f"{folder}: id {i!r}"
        sub = "/" in i or "\\" in i
        if sub and (os.path.isabs(i) or i.startswith("\\") or ".." in re.split(r"[\\/]", i)):
            raise PipelineError(f"{where} leaves {folder.name}/; expected a file name or a path inside {folder}")
        exact = i in entries or (sub and (folder / i).is_file())  # exact name (any extension) or sub-path
        match = [] if exact else _sub_stem(folder, i, where, by_stem)
        if exact:
            names.append(i)
        elif len(match) == 1:
            names.append(match[0])
        elif match:
            raise PipelineError(
                f"{where} matches {' and '.join(sorted(match)[:2])} in {folder.name}/; expected one image file per id"
            )
        else:
            want = f"{folder.name}/{i}" + ("" if _is_image(i) else f" or {folder.name}/{i}.<{exts}|...>")
            raise PipelineError(f"{where} has no image file in {folder}; expected {want}")
        _check_inside(folder, names[-1], entries.get(names[-1]), where)
        _once(seen, os.path.normpath(names[-1]), row, sub, ids, where)
    return names, entries


def _once(seen: dict, key: str, row: int, sub: bool, ids: list[str], where: str) -> None:
    """A path id naming the same file as another row (``./a.png`` and ``a.png``) is refused: one row per image."""
    first = seen.setdefault(key, (row, sub))
    if first[0] != row and (sub or first[1]):
        raise PipelineError(
            f"{where} is the same file as row {first[0] + 1} (id {ids[first[0]]!r}); expected one row per image"
        )
