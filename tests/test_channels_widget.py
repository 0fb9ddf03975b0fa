"""Multichannel images in the Segment widget: image layers of the same shape (napari opens each
channel of a file as its own layer) join the image as further channels of the model's input."""

from __future__ import annotations

import numpy as np
import pytest
from test_user_flow import click, go_to, look_at, nucleus, wait_preview

from napari_mobilesam._napari.controls import NO_CHANNEL
from napari_mobilesam.core.embeddings import compute_embedding
from napari_mobilesam.core.source import SliceSource
from napari_mobilesam.models.choice import ModelChoice
from napari_mobilesam.models.registry import build_sam

pytestmark = pytest.mark.gui


def _membrane(stack) -> np.ndarray:
    """A second channel unlike the first: a float ring stain around each nucleus."""
    from scipy import ndimage

    inside = stack.labels > 0
    ring = ndimage.binary_dilation(inside, iterations=3) & ~inside
    return (ring * 1000.0 + np.random.default_rng(1).normal(100, 10, stack.labels.shape)).astype(np.float32)


def test_a_second_channel_reaches_the_model(make_napari_viewer, qtbot, stack):
    """Picking a second layer in '+ channel' makes the model's slices the image (red) and that
    layer (green), each in its own range; a real click is then answered from that composite: the
    clicked slice's cached embedding is the encoder's output for the two-channel slice, not for
    the image alone. Only layers of the image's shape are offered; another image clears them."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    image = viewer.add_image(stack.image, name="nuclei")
    membrane = viewer.add_image(_membrane(stack), name="membrane")
    viewer.add_image(stack.image[:, :64, :64], name="crop")  # another shape: not offered
    _, widget = viewer.window.add_plugin_dock_widget("napari-mobilesam", "Segment (MobileSAM)")
    widget._c.image.value = image
    sam = build_sam("vit_t_test")
    widget.set_model(sam, ModelChoice("vit_t_test", "", "cpu"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert [name for name, _ in widget._channel_choices()] == [NO_CHANNEL, "membrane"]
    alone = widget.session

    widget._c.channel2.value = membrane
    assert widget.session is not alone and widget.channel_layers() == [membrane]
    assert "'nuclei' + 'membrane' as red, green" in widget.status
    source = widget.session.source
    reference = SliceSource(np.stack([stack.image, membrane.data], axis=-1), channel_axis=-1,
                            normalize=source.normalize)
    z, r, c, _gt = nucleus(stack, 0)
    rgb = source.rgb(z)
    np.testing.assert_array_equal(rgb, reference.rgb(z))
    assert rgb[..., 1].any() and not rgb[..., 2].any(), "green holds the membrane, blue is empty"

    go_to(viewer, image, z)
    look_at(viewer, image, (z, r, c))
    qtbot.wait(100)
    click(viewer, image, (z, r, c), qtbot=qtbot)
    qtbot.waitUntil(lambda: widget.session.is_embedded(z), timeout=60_000)
    wait_preview(qtbot, widget, timeout=60_000)
    got = widget.session.cache.get(widget.session.source, z).features
    expected = compute_embedding(sam, reference.rgb(z)).features
    off = float(np.abs(got.numpy() - expected.numpy()).max())
    assert off < 5e-3, off  # the cache keeps embeddings in float16
    gray = compute_embedding(sam, SliceSource(stack.image, normalize=source.normalize).rgb(z)).features
    assert float(np.abs(got.numpy() - gray.numpy()).max()) > 20 * off, "the membrane channel changed nothing"

    widget._c.image.value = membrane  # another image: the channels were the last image's
    assert widget._c.channel2.value == NO_CHANNEL and widget.channel_layers() == []
    assert [name for name, _ in widget._channel_choices()] == [NO_CHANNEL, "nuclei"]
    viewer.layers.remove(image)
    assert [name for name, _ in widget._channel_choices()] == [NO_CHANNEL]
