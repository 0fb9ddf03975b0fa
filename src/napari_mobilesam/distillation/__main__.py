"""``python -m napari_mobilesam.distillation ...`` and ``torchrun ... -m napari_mobilesam.distillation ...``:
the ``napari-mobilesam distill`` command (see :mod:`.command`)."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
