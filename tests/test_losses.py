"""The regulariser and the guidance loss against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperlora.method.losses import GuidanceDecoder, flat_outputs, guidance_loss, guidance_weight, output_regulariser
from hyperlora.tuner.hypernet import HyperNetwork


def test_output_regulariser_is_the_mean_over_sampled_tasks_of_squared_distances_of_every_modules_factors():
    """Computed per shape group on the heads' outputs; checked against numpy over every module's A and B."""
    torch.manual_seed(0)
    hypernet = HyperNetwork(
        [(4, 5), (6, 6), (4, 5)], r=2, task_embedding_dim=3, module_embedding_dim=3, hidden_dim=8, num_layers=1
    )
    for head in hypernet.heads.values():  # B starts at zero: give it something to compare
        torch.nn.init.normal_(head.weight)
    old = hypernet(torch.randn(3, 3))  # 3 old tasks, recorded
    rows = [2, 0]
    current, _ = hypernet(torch.randn(len(rows) + 1, 3)).split_tasks(len(rows))  # the sampled old tasks, then task t
    expected = 0.0
    for k, task in enumerate(rows):
        for m in range(3):
            for now, then in ((current.A[m], old.A[m]), (current.B[m], old.B[m])):
                expected += ((now[k].detach().numpy() - then[task].detach().numpy()) ** 2).sum()
    regulariser = output_regulariser(current, rows, flat_outputs(old))
    assert regulariser.item() == pytest.approx(expected / len(rows), rel=1e-5)
    assert regulariser.item() > 0


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
