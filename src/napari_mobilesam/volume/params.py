"""Settings of automatic segmentation: `AutoParams` (every size in pixels of the original slice)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError

__all__ = ["AutoParams"]


@dataclass(frozen=True)
class AutoParams:
    """Settings of automatic segmentation (every size is in pixels of the original slice).

    Attributes
    ----------
    blob_sigma : float
        Gaussian smoothing (pixels) applied before thresholding and peak finding.
    min_distance : int
        Minimum distance between two blob candidates; about the radius of the smallest object.
    polarity : {"auto", "bright", "dark"}
        Whether objects are brighter or darker than the background. ``"auto"`` takes the minority
        side of the Otsu threshold as the objects.
    grid : int
        Points per side of the coarse grid added to the blob candidates (0: none). Grid points
        closer than ``min_distance`` to a blob candidate are left out.
    max_points : int
        Upper bound on the number of prompts per slice (the strongest blobs are kept first).
    points_per_batch : int
        Prompts decoded per batched decoder call (the rest in power-of-two batches, see
        :func:`batch_bounds`). 16 was fastest on a 2-core CPU; 64 was slower per prompt.
    min_iou : float
        Minimum predicted IoU of a kept mask.
    min_stability : float
        Minimum stability score (IoU of the mask thresholded at +1 and -1) of a kept mask.
    min_area : int
        Masks and painted fragments smaller than this are dropped.
    max_area_fraction : float
        Masks covering more than this fraction of the slice (background) are dropped.
    nms_iou : float
        Two masks overlapping with a higher IoU are duplicates; the lower-scoring one goes.
    containment : float
        A mask whose area lies inside a better mask by more than this fraction goes (sub-parts).
    stitch_iou : float
        Minimum IoU between labels of neighbouring slices for them to share an id.
    stitch_overlap : float
        Or: minimum fraction of the smaller of two labels of neighbouring slices inside the other.
    stitch_gap : int
        Slices an object may be missed on and still keep its id through z.
    stitch_regrow : float
        Size-change rule of the stitcher: an object that has shrunk to less than half its largest
        area and then grows by more than this factor from its smallest recent area is a new
        object touching it in z (0: off).
    min_contrast : float
        Blob prompts only where objects stand out: the median difference between the Otsu
        classes of the smoothed slice must be at least this many times the slice's own pixel
        noise (a robust estimate from a high-pass of the slice), so the threshold follows each
        slice's contrast and noise. Pure noise scores about 0.2-0.5; faint real nuclei 3-5.
        Slices below it give no blob prompts (the grid still runs).
    blobs : bool
        Take prompts from blob detection (True) or use the grid alone (False: SAM's "everything"
        mode when ``grid`` is dense, e.g. 32).
    skip_covered : bool
        Decode in two rounds: first one point per blob (distance peaks), then the other candidates
        (Laplacian extras, grid) except those lying on an object the first round found.
    """

    blob_sigma: float = 2.0
    min_distance: int = 7
    polarity: str = "auto"
    grid: int = 4
    max_points: int = 256
    points_per_batch: int = 16
    min_iou: float = 0.80
    min_stability: float = 0.85
    min_area: int = 30
    max_area_fraction: float = 0.25
    nms_iou: float = 0.6
    containment: float = 0.85
    stitch_iou: float = 0.3
    stitch_overlap: float = 0.6
    stitch_gap: int = 1
    stitch_regrow: float = 1.3
    min_contrast: float = 2.0
    blobs: bool = True
    skip_covered: bool = True

    def __post_init__(self) -> None:
        if self.polarity not in ("auto", "bright", "dark"):
            raise InputError(f"polarity must be 'auto', 'bright' or 'dark', got {self.polarity!r}")
        for name in ("min_iou", "min_stability", "max_area_fraction", "nms_iou", "containment",
                     "stitch_iou", "stitch_overlap"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must lie in [0, 1], got {v!r}")
        for name in ("min_distance", "max_points", "points_per_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if min(self.grid, self.min_area, self.blob_sigma, self.min_contrast, self.stitch_gap,
               self.stitch_regrow) < 0:
            raise InputError("grid, min_area, blob_sigma, min_contrast, stitch_gap and stitch_regrow must not be negative")

    def replace(self, **changes) -> AutoParams:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return AutoParams(**{**asdict(self), **changes})
