"""The overlay grid: nearest-neighbour panels of at least 256 px and a legend in the palette's colours."""

import numpy as np
import pytest

from vocalign_hf.visualization import colorize, segmentation_grid


def test_grid_upscales_panels_and_draws_the_legend():
    palette = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[:, 4:] = 2
    labels[0, 0] = 255
    colours = colorize(labels, palette)
    assert colours[0, 0].tolist() == [0, 0, 0] and colours[0, 7].tolist() == [10, 10, 200]
    image = np.full((8, 8, 3), 128, dtype=np.uint8)
    grid = np.asarray(segmentation_grid([[image, colours]] * 2, ("image", "truth"), ["a", "b", "c"], palette))
    assert grid.shape[1] == 2 * 256 + 4 and grid.shape[0] > 2 * 256  # two 256-px columns, legend below
    top = 22 + 256 + 4  # second row
    assert grid[top + 10, 256 + 4 + 200].tolist() == [10, 10, 200]  # right half of the truth panel: class 2
    assert grid[top + 100, 256 + 4 + 40].tolist() == [200, 10, 10]  # left half: class 0
    assert grid[top, 256 + 4].tolist() == [0, 0, 0]  # the ignored pixel, a 32-px block after upscaling
    legend = grid[22 + 2 * 260 :]
    for colour in palette:  # every class has its swatch
        assert (legend == colour).all(axis=-1).sum() >= 100
    with pytest.raises(ValueError, match="one panel per title"):
        segmentation_grid([[image]], ("image", "truth"), ["a"], palette)
