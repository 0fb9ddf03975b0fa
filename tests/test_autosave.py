"""The labels autosave on disk (``napari_mobilesam.io.autosave``), without napari."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from napari_mobilesam.io import autosave as store


def _chunk_files(path) -> list:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(path / "c") for f in files)


def test_only_changed_slices_are_written_and_read_back(tmp_path):
    labels = np.zeros((6, 40, 30), np.uint32)
    saver = store.LabelsAutosave(tmp_path, "cells", labels.shape, labels.dtype)
    assert saver.save(labels) == 0 and not saver.path.exists(), "nothing drawn: no file"
    labels[2, 5:9, 5:9] = 3
    labels[4, 0:3, 0:3] = 7
    assert saver.save(labels) == 2
    assert saver.save(labels) == 0, "unchanged: nothing written"
    first = {f: os.stat(f).st_mtime_ns for f in _chunk_files(saver.path)}
    time.sleep(0.01)
    labels[4, 10, 10] = 8
    assert saver.save(labels) == 1
    changed = [f for f in _chunk_files(saver.path) if os.stat(f).st_mtime_ns != first.get(f)]
    assert len(changed) == 1 and changed[0].endswith(os.path.join("4", "0", "0"))
    back = store.read_autosave(saver.path)
    np.testing.assert_array_equal(back.labels, labels)
    assert back.labels.dtype == np.uint32 and back.image == "cells" and back.damaged == []
    assert back.describe().startswith("3 labels, saved ")
    labels[2] = 0  # an object deleted: its slice is written as zeros (no chunk file)
    assert saver.save(labels) == 1
    np.testing.assert_array_equal(store.read_autosave(saver.path).labels, labels)


def test_big_2d_labels_are_tiled(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "TILE", 16)
    labels = np.zeros((40, 50), np.int64)
    saver = store.LabelsAutosave(tmp_path, "slide", labels.shape, labels.dtype)
    labels[35:40, 48:50] = 2**40  # ids beyond 32 bits keep their dtype
    assert saver.save(labels) == 1
    labels[0, 0] = 1
    assert saver.save(labels) == 1
    back = store.read_autosave(saver.path)
    assert back.labels.dtype == np.int64
    np.testing.assert_array_equal(back.labels, labels)


def test_a_new_session_never_overwrites_an_earlier_autosave(tmp_path):
    shape = (3, 20, 20)
    first = np.zeros(shape, np.uint32)
    first[1, 2:5, 2:5] = 1
    store.LabelsAutosave(tmp_path, "cells", shape, np.uint32).save(first)
    time.sleep(1.1)  # the file moved aside is named by its time (seconds)
    again = store.LabelsAutosave(tmp_path, "cells", shape, np.uint32)
    assert again.save(np.zeros(shape, np.uint32)) == 0
    second = np.zeros(shape, np.uint32)
    second[2, 10:12, 10:12] = 4
    again.save(second)
    found = store.find_autosaves(tmp_path, "cells", shape)
    assert [p.name for p in found][0] == again.path.name and len(found) == 2
    np.testing.assert_array_equal(store.read_autosave(found[0]).labels, second)
    np.testing.assert_array_equal(store.read_autosave(found[1]).labels, first)
    # another image of the same name but another shape or source has its own file
    assert store.autosave_path(tmp_path, "cells", (3, 20, 21)) != again.path
    assert store.autosave_path(tmp_path, "cells", shape, source="/data/a.tif") != again.path
    assert store.find_autosaves(tmp_path, "cells", shape, source="/data/a.tif") == []


def test_older_autosaves_are_kept_up_to_a_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "KEEP_OLDER", 2)
    shape = (2, 8, 8)
    stamps = iter(range(1_700_000_000, 1_800_000_000, 3600))
    monkeypatch.setattr(store.time, "time", lambda: float(next(stamps)))
    for value in range(1, 6):
        labels = np.full(shape, value, np.uint32)
        store.LabelsAutosave(tmp_path, "cells", shape, np.uint32).save(labels)
    found = store.find_autosaves(tmp_path, "cells", shape)
    assert [int(store.read_autosave(p).labels.max()) for p in found] == [5, 4, 3]


def test_a_damaged_chunk_reads_as_background_and_is_named(tmp_path):
    labels = np.zeros((4, 16, 16), np.uint16)
    labels[1, 2:4, 2:4] = 5
    labels[3, 8:10, 8:10] = 6
    saver = store.LabelsAutosave(tmp_path, "cells", labels.shape, labels.dtype)
    saver.save(labels)
    victim = next(f for f in _chunk_files(saver.path) if f.endswith(os.path.join("1", "0", "0")))
    with open(victim, "wb") as fh:
        fh.write(b"not a chunk")
    back = store.read_autosave(saver.path)
    assert back.damaged == ["1,0,0"]
    assert not back.labels[1].any()
    np.testing.assert_array_equal(back.labels[3], labels[3])


def test_unwritable_folder_says_which_and_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    labels = np.zeros((2, 8, 8), np.uint32)
    labels[0, 1, 1] = 1
    before = labels.copy()
    saver = store.LabelsAutosave(blocker / "autosave", "cells", labels.shape, labels.dtype)
    with pytest.raises(OSError, match="cannot autosave labels to .*a-file.*choose another autosave folder"):
        saver.save(labels)
    np.testing.assert_array_equal(labels, before)
    assert blocker.read_text() == "not a folder"


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="2D or 3D integer labels"):
        store.LabelsAutosave(tmp_path, "x", (2, 3, 4, 5), np.uint32)
    with pytest.raises(ValueError, match="2D or 3D integer labels"):
        store.LabelsAutosave(tmp_path, "x", (4, 5), np.float32)
    saver = store.LabelsAutosave(tmp_path, "x", (4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"labels of shape \(5, 4\)"):
        saver.save(np.zeros((5, 4), np.uint8))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="is not a napari-mobilesam labels autosave"):
        store.read_autosave(tmp_path / "plain")


_KILLED_WHILE_SAVING = r"""
import sys
import numpy as np
from napari_mobilesam.io import autosave as store
shape = (8, 256, 256)
saver = store.LabelsAutosave(sys.argv[1], "cells", shape, np.uint32)
step = 0
while True:
    step += 1
    rng = np.random.default_rng(step)
    labels = rng.integers(0, 2**31, size=shape, dtype=np.uint32)  # incompressible: long writes
    labels[:, 0, 0] = step
    saver.save(labels)
    print(step, flush=True)
"""


def test_a_process_killed_while_saving_leaves_every_slice_readable(tmp_path):
    """``kill -9`` in the middle of saves: every slice reads back whole, from one save or another."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_SAVING, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # three whole saves, then a kill inside a later one
            assert proc.stdout.readline().strip()
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (path,) = store.find_autosaves(tmp_path, "cells", (8, 256, 256))
    back = store.read_autosave(path)
    assert back.damaged == []
    for z in range(8):
        step = int(back.labels[z, 0, 0])
        expected = np.random.default_rng(step).integers(0, 2**31, size=(8, 256, 256), dtype=np.uint32)[z]
        expected[0, 0] = step
        np.testing.assert_array_equal(back.labels[z], expected)
    # a session continuing the file removes the chunk left half-written (if the kill hit one)
    again = store.LabelsAutosave(tmp_path, "cells", (8, 256, 256), np.uint32)
    again.adopt()
    assert not list(path.rglob("*.partial"))
    again.save(back.labels)  # rewrites the chunks written after the last digests were (if any)
    assert again.save(back.labels) == 0
    np.testing.assert_array_equal(store.read_autosave(path).labels, back.labels)
