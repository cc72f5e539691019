"""The regulariser and the guidance loss against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperlora.method.losses import GuidanceDecoder, guidance_loss, guidance_weight, output_regulariser
from hyperlora.tuner.hypernet import HypernetOutput


def test_output_regulariser_is_the_mean_over_sampled_tasks_of_squared_distances():
    rng = np.random.default_rng(0)
    shapes = [((3, 2, 5), (3, 4, 2)), ((3, 2, 6), (3, 6, 2))]  # 3 old tasks; (A*, B*) per module
    targets_A = [torch.tensor(rng.normal(size=a)) for a, _ in shapes]
    targets_B = [torch.tensor(rng.normal(size=b)) for _, b in shapes]
    rows = [2, 0]
    current_A = [torch.tensor(rng.normal(size=(len(rows) + 1, *a[1:]))) for a, _ in shapes]  # + the current task
    current_B = [torch.tensor(rng.normal(size=(len(rows) + 1, *b[1:]))) for _, b in shapes]
    out = HypernetOutput(torch.zeros(3, 2, 4), current_A, current_B)
    expected = 0.0
    for k, task in enumerate(rows):
        for m in range(2):
            expected += ((current_A[m][k].numpy() - targets_A[m][task].numpy()) ** 2).sum()
            expected += ((current_B[m][k].numpy() - targets_B[m][task].numpy()) ** 2).sum()
    assert output_regulariser(out, rows, targets_A, targets_B).item() == pytest.approx(expected / len(rows))


def test_guidance_loss_is_one_minus_cosine_of_the_decoded_mean_hidden():
    torch.manual_seed(0)
    decoder = GuidanceDecoder(hidden_dim=8, embedding_dim=4, width=6)
    hidden = torch.randn(1, 5, 8)
    target = torch.randn(4)
    decoded = decoder.net(hidden.mean(dim=1))[0].detach().numpy()
    expected = 1 - decoded @ target.numpy() / (np.linalg.norm(decoded) * np.linalg.norm(target.numpy()))
    assert guidance_loss(decoder, hidden, target).item() == pytest.approx(expected, rel=1e-5)


def test_guidance_weight_schedule():
    assert [guidance_weight(t, 0.05) for t in (0, 1, 10, 20, 40)] == pytest.approx([0.0, 0.05, 0.5, 1.0, 1.0])
