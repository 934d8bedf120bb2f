import torch

from improved_diffusion.frame_batch import gather_frames


def test_slots_hold_the_named_frames_with_their_masks():
    T = 6
    videos = torch.arange(2 * T, dtype=torch.float32).view(2, T, 1, 1, 1).expand(2, T, 3, 2, 2).clone()
    out = gather_frames(videos, [[4, 0, 5], [2]], [[True, True, False], [False]])
    assert out["x"].shape == (2, 3, 3, 2, 2)
    assert out["frame_indices"].tolist() == [[4, 0, 5], [2, 0, 0]]
    assert out["x"][:, :, 0, 0, 0].tolist() == [[4, 0, 5], [T + 2, T, T]]  # padding repeats frame 0
    assert out["obs_mask"].flatten().tolist() == [1, 1, 0, 0, 0, 0]
    assert out["latent_mask"].flatten().tolist() == [0, 0, 1, 1, 0, 0]


def test_padding_from_a_callback_and_a_fixed_length():
    videos = torch.zeros(1, 4, 1, 1, 1)
    calls = []

    def pad(b, n):
        calls.append((b, n))
        return torch.full((n, 1, 1, 1), 7.0), [3] * n

    out = gather_frames(videos, [[1]], [[False]], length=3, pad=pad)
    assert calls == [(0, 2)]
    assert out["frame_indices"].tolist() == [[1, 3, 3]]
    assert out["x"].flatten().tolist() == [0, 7, 7]
    assert out["latent_mask"].flatten().tolist() == [1, 0, 0]


def test_each_slot_gets_the_vector_of_its_frame():
    """Vectors are gathered like the frames: padding repeats frame 0's, a pad callback brings its own."""
    videos = torch.zeros(2, 5, 1, 1, 1)
    actions = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    out = gather_frames(videos, [[4, 1], [2]], [[True, False], [False]], actions=actions)
    assert torch.equal(out["cond"], torch.stack([actions[0, [4, 1]], actions[1, [2, 0]]]))

    def pad(b, n):
        return torch.zeros(n, 1, 1, 1), [3] * n, torch.full((n, 2), -1.0)

    out = gather_frames(videos, [[4, 1], [2]], [[True, False], [False]], length=3, pad=pad, actions=actions)
    assert out["cond"][0, :2].tolist() == actions[0, [4, 1]].tolist() and out["cond"][1, 0].tolist() == [14, 15]
    assert (out["cond"][0, 2] == -1).all() and (out["cond"][1, 1:] == -1).all()
    assert "cond" not in gather_frames(videos[:1], [[4]], [[True]])
