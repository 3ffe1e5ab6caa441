"""Test frames shared by the video tests (a helper module: pytest collects only ``test_*.py``)."""

import numpy as np


def frames(n: int, h: int = 32, w: int = 32) -> np.ndarray:
    """(n, h, w, 3) uint8: background level 5*k in frame k, red 8x8 square at rows 4..11, cols k..k+7."""
    f = np.repeat((5 * np.arange(n, dtype=np.uint8))[:, None, None, None], 3, axis=-1)
    f = np.broadcast_to(f, (n, h, w, 3)).copy()
    for k in range(n):  # test data
        f[k, 4:12, k : k + 8] = [255, 0, 0]
    return f
