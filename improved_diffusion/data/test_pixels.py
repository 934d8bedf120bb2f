import numpy as np
import torch

from improved_diffusion.data.pixels import from_uint8, to_uint8


def test_every_level_round_trips_for_arrays_and_tensors():
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(levels)), levels)
    t = torch.from_numpy(levels)
    assert torch.equal(to_uint8(from_uint8(t)), t)


def test_rounds_to_nearest_level_and_clips():
    # -1 + (k + 0.4) / 127.5 lies 0.4 levels above level k: it must round down to k, 0.6 above rounds up.
    k = np.arange(10, 20)
    assert np.array_equal(to_uint8(-1 + (k + 0.4) / 127.5), k)
    assert np.array_equal(to_uint8(-1 + (k + 0.6) / 127.5), k + 1)
    assert to_uint8(np.array([-3.0, 7.0])).tolist() == [0, 255]
    assert to_uint8(torch.tensor([-3.0, 7.0])).tolist() == [0, 255]
    assert to_uint8(torch.zeros(2)).dtype == torch.uint8
