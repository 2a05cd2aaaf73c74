"""The pictures explain themselves: a spread of a few timesteps is visible, regions have a
light background and a legend, grids carry their header and multi-line titles."""

import numpy as np
import torch
from PIL import Image

from asyndm.viz import BACKGROUND_COLOUR, comparison_grid, mode_titles, timestep_frame


def test_a_small_timestep_spread_spans_the_colour_scale():
    t = torch.full((4, 4), 521)
    t[:2] = 556  # subject pixels 35 timesteps behind the background
    labels = torch.full((4, 4), -1)
    labels[:2] = 0
    frame = np.asarray(timestep_frame(t, labels, 12, 25, cell=64, title="a red circle",
                                      label_names=["red circle"]))
    # the heatmap starts on the first row whose left margin is not white (under the title)
    heat = [row for row in range(frame.shape[0]) if tuple(frame[row, 2]) != (255, 255, 255)]
    first = heat[0]
    low, high = frame[first + 48, 10].astype(int), frame[first + 4, 10].astype(int)
    assert np.abs(high - low).sum() > 200  # viridis ends, not two neighbouring shades
    region = frame[first + 48, 64 + 10]
    assert tuple(region) == BACKGROUND_COLOUR and min(BACKGROUND_COLOUR) > 150


def test_grid_header_and_titles_make_room_for_their_lines():
    img = Image.new("RGB", (32, 32), (10, 200, 10))
    plain = comparison_grid([[img] * 3], ["DM", "DM_concave", "AsynDM"], cell=64)
    told = comparison_grid([[img] * 3], mode_titles("0.3"), ["seed 0: a cat"], cell=64,
                           captions=[["ok", "", "wrong"]], header="header " * 30)
    assert told.width == plain.width and told.height > plain.height + 60
    assert "k=0.3" in mode_titles("0.3")[1] and "lag" in mode_titles("0.3")[2]
