"""Image-folder competitions: ``train/`` + ``train.csv`` (id,label), ``test/`` + ``test.csv`` (id) or
every image in ``test/`` (dogs-vs-cats, plant seedlings, aerial cactus and the like).

An ``id`` is a file name (``abc.jpg``, aerial-cactus style), a file stem (``abc``, any image
extension) or a path under the split folder (``daisy/123.jpg``, ``daisy/123``). Without ``train.csv``,
a ``train/`` of class folders is read as ``train/<class>/<image>``: the folder name is the class (text,
never a number: ``01`` and ``1`` are two classes) and the id ``<class>/<image>``; ``test/`` stays flat
(see ``image_files``: listings, ids -> files, and the containment rule).

Each file is decoded and resized once into a memory-mapped ``.npy`` cache under ``cache_dir()/image_folder/``,
keyed by the folder, its files' names (paths under it: the layout), sizes and times and the image
size/channels; the next read maps that array without decoding (``data.cache: false`` disables it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import field_validator

from pipeline.config.options import DataOptions, ImageSpec
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, cache_dir
from pipeline.data.formats.base import Reader
from pipeline.data.formats.image_files import (  # noqa: F401 - IMAGE_EXTS, _check_inside: this module's names too
    IMAGE_EXTS,
    _check_inside,
    _files,
    _image_files,
    _natural,
    check_flat,
    class_folders,
    has_class_folders,
    resolve,
)
from pipeline.data.sample import read_sample, sample_path
from pipeline.data.table import Table

GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
VALUE_RANGE = (0.0, 255.0)  # uint8 pixels
CACHE_VERSION = 1
CHUNK = 64  # files per decode task


def _decode(path: str | Path, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """One file -> (C, H, W) uint8, resized to ``size`` (W, H) when given."""
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as im:
        if size:
            im.draft(mode, size)  # JPEG: decode straight at a smaller scale when much larger
        im = im.convert(mode)
    if size and im.size != size:
        im = im.resize(size, Image.BILINEAR)  # Pillow's bilinear antialiases when shrinking
    a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stat(entry_or_path) -> list:
    st = entry_or_path.stat() if isinstance(entry_or_path, os.DirEntry) else os.stat(entry_or_path)
    return [st.st_size, st.st_mtime_ns]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class ImageFolderOptions(DataOptions):
    @field_validator("channels")
    @classmethod
    def _grey_or_rgb(cls, v):
        if v not in (None, 1, 3, "auto"):
            raise ValueError(
                f"{v} is not supported by image_folder; expected 1 (grey), 3 (RGB), null or auto (from the files)"
            )
        return v

    def image_spec(self) -> ImageSpec:
        return super().image_spec()._replace(value_range=VALUE_RANGE)


class ImageFolder(Reader):
    Options = ImageFolderOptions
    submission_columns = ("id", "label")
    submission_kind = "name"

    def _read(self, split: str) -> Table:
        folder = self.dir / split
        if not folder.is_dir():
            raise PipelineError(
                f"{folder}: folder not found (data.dir is {self.cfg.data.dir}); "
                f"expected {split}/ holding the {split} images"
            )
        if split == "train":
            ids, class_names, labels, entries = self._labelled()
            names = ids
            if entries is None:  # train.csv: its ids are file names, stems or paths
                names, entries = resolve(ids, folder, self.source)
        else:  # class names (and their order) come from train.csv or the class folders
            ids, _ = self._rows(split)
            names, entries = resolve(ids, folder, self.source)
            class_names, labels = self._labelled(source=False)[1], None
        images = self._images(split, names, ids, entries)
        return Table(
            ids=np.asarray(ids, dtype=object),
            images=images,
            class_names=class_names,
            labels=labels,
            value_range=VALUE_RANGE,
        )

    def native_size(self) -> int:
        """The most common smaller side of the training files (headers only: nothing is decoded)."""
        from collections import Counter

        folder = self.dir / "train"
        if not folder.is_dir():
            raise PipelineError(
                f"{folder}: folder not found (data.dir is {self.cfg.data.dir}); "
                "expected train/ holding the train images"
            )
        paths = [os.path.join(folder, n) for n in self._all_files(("train",))["train"]]
        if not paths:
            raise PipelineError(f"{folder}: no image files; expected the training images")

        def side(p: str) -> int | None:
            try:
                return min(_header(p)[0])
            except Exception:  # an unreadable file is reported, with its id, when the images are decoded
                return None

        with ThreadPoolExecutor(_workers()) as ex:
            sides = Counter(s for s in ex.map(side, paths) if s)
        if not sides:
            raise PipelineError(
                f"{folder}: no readable image files; expected images Pillow can decode (PNG, JPEG, ...)"
            )
        return max(sides.items(), key=lambda kv: (kv[1], kv[0]))[0]

    # ---- rows: ids (and labels) from the CSV, the class folders, or the test folder itself ----

    def _labelled(self, source: bool = True) -> tuple[list[str], list[str], np.ndarray, dict | None]:
        """Training ids, class names, label indices and (class folders: already listed) each id's file."""
        folder = self.dir / "train"
        if not (self.dir / "train.csv").exists() and has_class_folders(folder):
            c = class_folders(folder)
            if source:
                self.source = folder
            return c.ids, c.class_names, c.labels, c.entries
        ids, raw = self._rows("train", source)
        return ids, *_classes(raw), None

    def _all_files(self, splits=("train", "test")) -> dict[str, dict]:
        """Every image whose header counts when the size or channels come from the files (and the native
        size): the images directly in train/ and test/, and the training images in sub-folders."""
        out = {s: dict(_image_files(self.dir / s)) for s in splits}
        folder = self.dir / "train"
        if (self.dir / "train.csv").exists():
            ids, _ = self._rows("train", source=False)
            if any("/" in i or "\\" in i for i in ids):  # paths (flat ids: only the listing, as ever)
                names, entries = resolve(ids, folder, self.dir / "train.csv")
                out["train"].update((n, os.path.join(folder, n)) for n in names if n not in entries)
        elif has_class_folders(folder):
            out["train"].update(class_folders(folder).entries)
        return out

    def _rows(self, split: str, source: bool = True) -> tuple[list[str], pd.Series | None]:
        """Ids and raw labels; ``source`` names the file in later messages (the base class's checks)."""
        csv = self.dir / f"{split}.csv"
        if split == "test" and not csv.exists():
            self.source = self.dir / split
            if not (self.dir / "train.csv").exists() and has_class_folders(self.dir / "train"):
                check_flat(self.source)
            sample = sample_path(self.cfg)
            if sample is not None:  # the sample's ids name the test files (with or without their extension)
                self.source = sample
                return read_sample(sample)[1], None
            names = sorted(_image_files(self.dir / split), key=_natural)
            if not names:
                raise PipelineError(
                    f"{self.source}: the test set is empty (no test.csv and no image files); "
                    "expected image files (.png, .jpg, ...)"
                )
            return (names if self._ids_with_ext() else [os.path.splitext(n)[0] for n in names]), None
        csv = self.path(f"{split}.csv")
        if source:
            self.source = csv
        try:
            df = pd.read_csv(csv, dtype=str, skipinitialspace=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise PipelineError(
                f"{csv}: cannot parse CSV ({str(e).splitlines()[0]}); expected a header and one row per image"
            ) from None
        df.columns = [str(c).strip() for c in df.columns]
        wanted = "id,label" if split == "train" else "id"
        for col in wanted.split(","):
            if col not in df.columns:
                raise PipelineError(
                    f"{csv}: missing column '{col}'; expected columns {wanted} (found {','.join(df.columns)})"
                )
        if len(df) == 0:
            raise PipelineError(f"{csv}: the {split} set is empty; expected at least one row")
        ids = df["id"].str.strip()
        bad = ids.isna() | (ids == "")
        if bad.any():
            raise PipelineError(
                f"{csv}: row {int(np.flatnonzero(bad)[0]) + 1} has an empty id; "
                f"expected a file name or stem in {split}/"
            )
        dup = ids.duplicated(keep=False)
        if dup.any():
            rows = np.flatnonzero(ids == ids[dup].iloc[0]) + 1
            raise PipelineError(
                f"{csv}: duplicate id {ids[dup].iloc[0]!r} (rows {rows[0]} and {rows[1]}); expected unique ids"
            )
        labels = None
        if split == "train":
            labels = df["label"].str.strip()
            bad = labels.isna() | (labels == "")
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                raise PipelineError(
                    f"{csv}: row {r + 1} (id {ids.iloc[r]!r}) has an empty label; expected a class name or integer"
                )
        return ids.tolist(), labels

    def _ids_with_ext(self) -> bool:
        """Test ids follow train.csv: file names if its ids carry an image extension, else stems."""
        train_ids = self._labelled(source=False)[0]
        return any(os.path.splitext(i)[1].lower() in IMAGE_EXTS for i in train_ids)

    # ---- pixels: the memory-mapped cache, else decode ----

    def _images(self, split: str, names: list[str], ids: list[str], entries: dict) -> np.ndarray:
        size, channels = self.cfg.data.image_size, self.cfg.data.channels
        auto = size is None or channels is None
        folder = (self.dir / split).resolve()
        base = str(self.dir / split)
        files = [os.path.join(base, n) for n in names]
        key = {
            "v": CACHE_VERSION,
            "dir": str(folder),
            "size": size,
            "channels": channels,
            "rows": [[n, *_stat(entries.get(n) or f)] for n, f in zip(names, files)],
        }
        every = self._all_files() if auto else {}
        if auto:  # the resolved size/channels depend on every file of both splits
            key["all"] = {s: sorted([n, *_stat(e)] for n, e in fs.items()) for s, fs in every.items()}
        if not self.cfg.data.cache:
            arr = np.empty(self._shape(size, channels, files, ids, every), np.uint8)
            self._decode_all(files, ids, split, arr.shape, arr.__setitem__)
            return arr
        slot = cache_dir() / "image_folder" / _digest([str(folder), size, channels])
        path = slot / f"{_digest(key)}.npy"
        if path.is_file():
            try:
                arr = np.load(path, mmap_mode="r")
                if arr.dtype == np.uint8 and arr.ndim == 4 and len(arr) == len(files):
                    return arr
            except (ValueError, OSError):  # damaged cache: decode again
                pass
        shape = self._shape(size, channels, files, ids, every)
        slot.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a killed decode leaves only a temp file, never a half cache
            offset = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).offset  # header + size
            row = int(np.prod(shape[1:]))
            # pwrite, not a writable memmap: written pages stay in the page cache, out of this process's RSS.
            with open(tmp, "r+b") as f:
                fd = f.fileno()
                self._decode_all(files, ids, split, shape, lambda i, a: os.pwrite(fd, a.tobytes(), offset + i * row))
        _prune(slot, keep=path)
        return np.load(path, mmap_mode="r")

    def _shape(
        self, size: int | None, channels: int | None, files: list[str], ids: list[str], every: dict
    ) -> tuple[int, int, int, int]:
        """(N, C, H, W); with size or channels unset, read the header of ``every`` file of both splits."""
        n = len(files)
        if size is not None and channels is not None:
            return n, channels, size, size
        paths = [os.path.join(str(self.dir / s), name) for s, fs in every.items() for name in fs]
        id_of = dict(zip(files, ids))

        def header(p: str):
            try:
                return _header(p)
            except Exception as e:
                raise _bad_image(p, id_of.get(p), e) from None

        with ThreadPoolExecutor(_workers()) as ex:
            headers = dict(zip(paths, ex.map(header, paths)))
        sizes = {h[0] for h in headers.values()}
        if size is None and len(sizes) > 1:
            (a, sa), (b, sb) = _two_sizes(headers)
            raise PipelineError(
                f"{a}: image is {sa[0]}x{sa[1]} but {b} is {sb[0]}x{sb[1]}; "
                "expected data.image_size set to resize every image to one square size"
            )
        if channels is None:
            channels = 3 if any(mode not in GREY_MODES for _, mode in headers.values()) else 1
        w, h = (size, size) if size is not None else next(iter(sizes))
        return n, channels, h, w

    def _decode_all(self, files: list[str], ids: list[str], split: str, shape: tuple, put) -> None:
        """Decode every file to ``shape[1:]`` in threads (Pillow releases the GIL); ``put(i, array)``."""
        size, channels = (shape[3], shape[2]), shape[1]

        def work(start: int) -> None:
            for i in range(start, min(start + CHUNK, len(files))):
                try:
                    a = _decode(files[i], size, channels)
                    if a.shape != shape[1:]:  # e.g. the file changed since its header was read
                        raise ValueError(f"decoded to {a.shape}, expected {shape[1:]}")
                except Exception as e:  # any Pillow failure is a bad file
                    raise _bad_image(files[i], ids[i], e) from None
                put(i, a)

        from tqdm.auto import tqdm

        with ThreadPoolExecutor(_workers()) as ex:
            futures = [ex.submit(work, s) for s in range(0, len(files), CHUNK)]
            try:
                for f in tqdm(futures, desc=f"decode {split} images", unit="chunk", disable=None, leave=False):
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def _bad_image(path: str | Path, rid: str | None, e: Exception) -> PipelineError:
    msg = str(e).replace(f" '{path}'", "").replace("\n", " ")[:160]
    where = f"{path}: id {rid!r}" if rid is not None else str(path)
    return PipelineError(
        f"{where}: cannot read image ({type(e).__name__}: {msg}); "
        "expected an image file Pillow can decode (PNG, JPEG, ...)"
    )


def _header(path: str | Path) -> tuple[tuple[int, int], str]:
    with Image.open(path) as im:
        return im.size, im.mode


def _two_sizes(headers: dict) -> tuple:
    first = next(iter(headers.items()))
    other = next((p, h) for p, h in headers.items() if h[0] != first[1][0])
    return (first[0], first[1][0]), (other[0], other[1][0])


def _prune(slot: Path, keep: Path) -> None:
    """Drop older caches of the same folder/size (their files changed) and day-old temp files."""
    for p in slot.iterdir():
        stale_tmp = p.name.endswith(".tmp") and time.time() - p.stat().st_mtime > 86400
        if (p.suffix == ".npy" and p != keep) or stale_tmp:
            p.unlink(missing_ok=True)


def _classes(raw: pd.Series) -> tuple[list[str], np.ndarray]:
    """Class names in numeric order when every label is an integer, else sorted; and label indices."""
    num = pd.to_numeric(raw, errors="coerce")
    if num.notna().all() and (num == num.round()).all():
        values = num.astype(np.int64).to_numpy()
        uniq = np.unique(values)
        return [str(v) for v in uniq], np.searchsorted(uniq, values).astype(np.int64)
    values = raw.to_numpy(dtype=object).astype(str)
    uniq = np.unique(values)
    return uniq.tolist(), np.searchsorted(uniq, values).astype(np.int64)
