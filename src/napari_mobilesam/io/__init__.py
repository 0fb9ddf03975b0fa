"""Files in and out: prompts (CSV, napari layer data, arrays), stacks (lazy TIFF in, labels out)
and the labels autosave (Zarr)."""
