import torch

from asyndm.masks import (BACKGROUND, initial_labels, k_map_from_labels, region_labels,
                          resize_labels)


def test_threshold_at_spatial_mean_and_priority_by_k():
    attn = torch.zeros(1, 2, 2, 2)
    attn[0, 0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # mean 0.5: top row claimed
    attn[0, 1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # mean 0.5: anti-diagonal claimed
    labels = region_labels(attn, torch.tensor([[0.3, 0.7]]))
    assert labels.tolist() == [[[0, 1], [1, BACKGROUND]]]
    labels = region_labels(attn, torch.tensor([[0.7, 0.3]]))
    assert labels.tolist() == [[[0, 0], [1, BACKGROUND]]]
    # equal k: the earlier subject wins
    assert region_labels(attn, torch.tensor([[0.5, 0.5]])).tolist() == [[[0, 0], [1, -1]]]


def test_threshold_multiple_and_padding():
    attn = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # (2,1,2,2)
    assert region_labels(attn[:1], torch.tensor([[0.5]]), 1.5).tolist() == [[[-1, -1], [-1, 0]]]
    # a padded subject (k = 0) never claims, even where its map is uniform
    labels = region_labels(attn, torch.tensor([[0.5], [0.0]]))
    assert (labels[1] == BACKGROUND).all()


def test_resize_nearest_non_square_and_k_map():
    labels = torch.tensor([[[0, -1], [1, 0]]])
    big = resize_labels(labels, (4, 6))
    assert big.shape == (1, 4, 6) and big[0, 0].tolist() == [0, 0, 0, -1, -1, -1]
    k = k_map_from_labels(big, torch.tensor([[0.3, 0.7]]))
    assert torch.allclose(k[0, 0], torch.tensor([0.3] * 3 + [0.0] * 3))
    assert torch.allclose(k[0, 3], torch.tensor([0.7] * 3 + [0.3] * 3))


def test_initial_labels_pick_the_last_subject_by_token_position():
    pos = torch.tensor([[4, 1], [2, 5]])
    k = torch.tensor([[0.5, 0.5], [0.5, 0.0]])  # second sample: subject 1 is padding
    labels = initial_labels(pos, k, (2, 3))
    assert (labels[0] == 0).all() and (labels[1] == 0).all()
