"""Objects through z: `ObjectPrompts`, the one converter to it, and prompts derived from masks.

A slice is prompted with a `core.predictor.Prompt`; an object followed through z is an
`ObjectPrompts`: prompts and/or existing masks on some of its slices. `as_objects` is the only place
that accepts other forms (``{label: {z: Prompt | dict | (H, W) bool}}``) and checks them.
Coordinates: (z, row, col); masks (H, W) bool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError, PromptError

if TYPE_CHECKING:  # core.predictor imports torch: loaded only when prompts are checked
    from ..core.predictor import Prompt

__all__ = ["ObjectPrompts", "as_objects", "objects_from_labels", "prompts_from_mask", "is_negative_only"]


@dataclass
class ObjectPrompts:
    """One object to propagate.

    Attributes
    ----------
    label : int
        The label id written into the output (> 0).
    prompts : dict z -> Prompt (or a dict of its fields)
        Prompts on annotated slices, points in (row, col). A prompt with only negative points (label
        0), no box and no mask marks a slice the object must not reach: propagation stops before it.
    masks : dict z -> (H, W) bool
        Existing masks of the object (e.g. from a Labels layer); kept as they are and used as seeds.
    """

    label: int
    prompts: dict[int, Any] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)


def is_negative_only(p: Prompt) -> bool:
    """True for a prompt of negative points only (no box, no mask): a "do not reach" marker."""
    if p.box is not None or p.mask_input is not None or p.points is None:
        return False
    lab = np.ones(len(np.asarray(p.points).reshape(-1, 2))) if p.labels is None else np.asarray(p.labels)
    return lab.size > 0 and bool(np.all(lab == 0))


def _from_mapping(objects: Mapping) -> list[ObjectPrompts]:
    objs = []
    for label, per_z in objects.items():
        if not isinstance(per_z, Mapping):
            raise PromptError(
                f"object {label}: expected a dict z -> prompt or mask, got {type(per_z).__name__}"
            )
        o = ObjectPrompts(int(label))
        for z, v in per_z.items():
            if isinstance(v, np.ndarray) and v.ndim == 2:
                o.masks[int(z)] = v
            else:
                o.prompts[int(z)] = v
        objs.append(o)
    return objs


def _checked(o: ObjectPrompts, n: int, shape: tuple[int, int]) -> ObjectPrompts:
    from ..core.predictor import as_prompt

    label = int(o.label)
    if label <= 0:
        raise PromptError(f"label ids must be positive integers, got {o.label}")
    prompts = {}
    for z, p in o.prompts.items():
        z = int(z)
        if not 0 <= z < n:
            raise PromptError(f"object {label}: prompt on slice {z}, but the stack has {n} slices")
        try:
            prompts[z] = as_prompt(p)
        except PromptError as e:
            raise PromptError(
                f"object {label}: the prompt on slice {z} must be a Prompt or a dict of its fields "
                f"(points, labels, box, mask_input, multimask): {e}"
            ) from None
    masks = {}
    for z, m in o.masks.items():
        z = int(z)
        if not 0 <= z < n:
            raise PromptError(f"object {label}: mask on slice {z}, but the stack has {n} slices")
        m = np.asarray(m)
        if m.shape != shape:
            raise PromptError(f"object {label}: mask on slice {z} has shape {m.shape}, slices are {shape}")
        masks[z] = m.astype(bool)
        if not masks[z].any():
            raise PromptError(f"object {label}: the mask on slice {z} is empty")
    both = set(prompts) & set(masks)
    if both:
        raise PromptError(f"object {label}: slices {sorted(both)} have both a prompt and a mask; give one")
    if not [z for z, p in prompts.items() if not is_negative_only(p)] and not masks:
        raise PromptError(
            f"object {label} has no positive prompt or mask: give at least one slice with a positive "
            "point, a box or a mask (negative-only prompts only mark where to stop)"
        )
    return ObjectPrompts(label, prompts, masks)


def as_objects(objects: Any, n: int, shape: tuple[int, int]) -> list[ObjectPrompts]:
    """Checked `ObjectPrompts` for a stack of ``n`` slices of ``shape`` (H, W).

    ``objects``: a list of ObjectPrompts, one ObjectPrompts, or ``{label: {z: Prompt | dict of its
    fields | (H, W) bool mask}}``. Prompts become `Prompt`, masks bool copies. Raises `PromptError`
    (a ValueError) naming the object and slice for anything unusable.
    """
    if isinstance(objects, ObjectPrompts):
        objects = [objects]
    elif isinstance(objects, Mapping):
        objects = _from_mapping(objects)
    out: list[ObjectPrompts] = []
    seen: set[int] = set()
    for o in objects:
        if not isinstance(o, ObjectPrompts):
            raise PromptError(
                f"objects must be ObjectPrompts (or a dict label -> {{z: prompt}}), got {type(o).__name__}"
            )
        o = _checked(o, n, shape)
        if o.label in seen:
            raise PromptError(f"label id {o.label} is given twice: merge its prompts into one ObjectPrompts")
        seen.add(o.label)
        out.append(o)
    if not out:
        raise PromptError("no objects to propagate: give at least one ObjectPrompts")
    return out


def objects_from_labels(
    labels: np.ndarray, ids: Iterable[int] | None = None, *, zs: Iterable[int] | None = None
) -> list[ObjectPrompts]:
    """Objects seeded by existing masks: for each label id, its mask on every slice where it appears.

    Parameters
    ----------
    labels : (Z, H, W) int array (e.g. a napari Labels layer's data)
    ids : label ids to take (default: every non-zero id present)
    zs : only take seeds from these slices (default: all)
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise InputError(f"labels must be a (Z, H, W) volume, got shape {lab.shape}")
    if lab.dtype.kind not in "ui":
        raise InputError(f"labels must have an integer dtype, got {lab.dtype}")
    z_list = range(lab.shape[0]) if zs is None else [int(z) for z in zs]
    wanted = None if ids is None else {int(i) for i in ids}
    objs: dict[int, ObjectPrompts] = {}
    for z in z_list:
        sl = lab[z]
        for i in np.unique(sl):
            i = int(i)
            if i <= 0 or (wanted is not None and i not in wanted):
                continue
            objs.setdefault(i, ObjectPrompts(i)).masks[z] = sl == i
    if wanted is not None:
        missing = wanted - set(objs)
        if missing:
            raise InputError(f"label id(s) {sorted(missing)} do not appear in the given slices")
    return [objs[i] for i in sorted(objs)]


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1) inclusive bounds of a (H, W) bool mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def prompts_from_mask(
    mask: np.ndarray,
    *,
    n_points: int = 1,
    box_margin: float = 0.1,
    min_margin: int = 2,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Box and positive points for the next slice from a (H, W) bool mask.

    Returns ``(box, points)``: box (row0, col0, row1, col1) float, the mask's bounding box grown by
    ``box_margin`` of its size (at least ``min_margin`` pixels) on each side and clipped to the slice;
    points (n, 2) (row, col): the deepest pixel of the distance transform, then further points far
    from the ones chosen among pixels at least half as deep. None for an empty mask.
    """
    H, W = mask.shape
    bb = bbox(mask)
    if bb is None:
        return None
    r0, c0, r1, c1 = bb
    mr = max(1, min_margin, box_margin * (r1 - r0 + 1))
    mc = max(1, min_margin, box_margin * (c1 - c0 + 1))
    box = np.array(
        [max(0.0, r0 - mr), max(0.0, c0 - mc), min(H - 1.0, r1 + mr), min(W - 1.0, c1 + mc)], float
    )
    crop = np.pad(mask[r0 : r1 + 1, c0 : c1 + 1], 1)
    dt = ndi.distance_transform_edt(crop)
    pr, pc = np.unravel_index(int(np.argmax(dt)), dt.shape)
    points = [(pr, pc)]
    if n_points > 1:
        deep = np.argwhere(dt >= 0.5 * dt.max())
        d2 = ((deep - np.array([pr, pc])) ** 2).sum(1).astype(float)
        for _ in range(n_points - 1):
            if d2.max() <= 0:
                break
            k = int(np.argmax(d2))
            points.append(tuple(deep[k]))
            d2 = np.minimum(d2, ((deep - deep[k]) ** 2).sum(1))
    pts = np.array(points, float) + np.array([r0 - 1, c0 - 1])  # undo crop and padding
    return box, pts
