"""Walks cut into windows: the cut, its Arrow form, and a module light enough for every Ray Data worker."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa

from raywalk.service.windows import batch_to_windows, walks_to_windows, windows_per_walk


def test_walks_are_cut_walk_major_and_the_tail_dropped():
    walks = np.arange(2 * 11).reshape(2, 11)            # L 11, w 4: two 5-token windows per walk, 1 dropped
    assert windows_per_walk(11, 4) == 2
    assert walks_to_windows(walks, 4).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                                  [11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]


def test_an_arrow_batch_gives_the_same_windows_and_an_empty_one_none():
    walks = np.random.default_rng(0).integers(0, 50, size=(7, 15), dtype=np.int32)
    table = pa.table({"walk": pa.array(list(walks), type=pa.list_(pa.int32()))})
    got = batch_to_windows(table, 4)["tokens"]
    assert got.dtype == np.int32 and np.array_equal(got, walks_to_windows(walks, 4))
    assert batch_to_windows(table.slice(0, 0), 4)["tokens"].shape[0] == 0


def test_the_module_imports_no_torch():
    p = subprocess.run([sys.executable, "-c", "import sys, raywalk.service.windows; print('torch' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False"
