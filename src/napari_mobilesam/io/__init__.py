"""Files in and out: prompts (CSV, napari layer data, arrays) and stacks (lazy TIFF in, labels out)."""
