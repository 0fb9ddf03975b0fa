"""The synthetic nuclei generator and the npe2 sample data in a real viewer."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_mobilesam.data import cell_image, synthetic_nuclei


def test_generator_is_deterministic_and_seeded():
    a = synthetic_nuclei(shape=(12, 96, 96), n_nuclei=6, seed=3)
    b = synthetic_nuclei(shape=(12, 96, 96), n_nuclei=6, seed=3)
    c = synthetic_nuclei(shape=(12, 96, 96), n_nuclei=6, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


def test_default_stack_shape_dtype_and_objects(nuclei_stack):
    s = nuclei_stack
    assert s.image.shape == s.labels.shape == (40, 256, 256)
    assert s.image.dtype == np.uint16 and s.labels.dtype == np.uint16
    ids = np.unique(s.labels)[1:]
    assert len(ids) == s.n_objects >= 20
    np.testing.assert_array_equal(ids, np.arange(1, s.n_objects + 1))
    # Varied sizes and brightness, as the docs promise.
    sizes = ndi.sum_labels(np.ones_like(s.labels), s.labels, ids)
    assert sizes.max() > 3 * sizes.min()
    assert s.brightness.max() - s.brightness.min() > 0.3


def test_every_label_sits_on_a_bright_nucleus(nuclei_stack):
    s = nuclei_stack
    ids = np.arange(1, s.n_objects + 1)
    background = np.median(s.image[s.labels == 0])
    inside = ndi.median(s.image.astype(np.float32), s.labels, ids)
    assert np.all(inside > background * 1.8), inside / background


def test_some_nuclei_touch(nuclei_stack):
    """Touching nuclei share a boundary but keep distinct labels."""
    lab = nuclei_stack.labels
    grown = ndi.grey_dilation(lab, size=(1, 3, 3))
    touching = (lab > 0) & (grown > 0) & (grown != lab)
    assert touching.sum() > 0


def test_nuclei_span_several_slices_and_end_inside(nuclei_stack):
    lab = nuclei_stack.labels
    for obj in ndi.find_objects(lab):
        zspan = obj[0].stop - obj[0].start
        assert 5 <= zspan < lab.shape[0]


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        synthetic_nuclei(shape=(10, 10))


def test_cell_image():
    img = cell_image()
    assert img.ndim == 2 and img.dtype == np.uint8


@pytest.mark.gui
def test_samples_open_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mobilesam", "nuclei_3d")
    image, gt = viewer.layers["nuclei"], viewer.layers["nuclei ground truth"]
    assert image.data.shape == gt.data.shape == (40, 256, 256)
    assert image.data.dtype == np.uint16 and gt.data.dtype == np.uint16
    assert image.ndim == 3 and not image.rgb
    assert type(gt).__name__ == "Labels"
    viewer.open_sample("napari-mobilesam", "cell_2d")
    assert viewer.layers["cell"].data.ndim == 2


@pytest.mark.gui
def test_screenshot_of_sample_is_not_blank(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-mobilesam", "nuclei_3d")
    viewer.layers["nuclei ground truth"].visible = True
    viewer.dims.set_point(0, 20)
    shot = viewer.screenshot(path=str(tmp_path / "sample.png"), canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4
    rgb = shot[..., :3].astype(float)
    assert rgb.std() > 10, "screenshot is blank"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    assert (tmp_path / "sample.png").stat().st_size > 1000


@pytest.mark.gui
def test_demo_opens_sample_and_every_dock_widget(make_napari_viewer):
    """What `./quickstart demo` shows: the sample stack and the plugin's dock widgets."""
    from npe2 import PluginManifest

    from napari_mobilesam._napari.demo import open_demo

    viewer = make_napari_viewer()
    widgets = open_demo(viewer)
    manifest = PluginManifest.from_distribution("napari-mobilesam")
    assert len(widgets) == len(manifest.contributions.widgets) >= 2
    assert "nuclei" in viewer.layers
    assert [type(w).__name__ for w in widgets] == ["SegmentWidget", "DistillWidget"]
