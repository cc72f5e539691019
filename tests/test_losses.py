"""The regulariser and the guidance loss against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperlora.method.losses import flat_outputs, guidance_loss, guidance_weight, output_regulariser, relation_targets
from hyperlora.tuner.hypernet import HyperNetwork, _shape_key


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


def _all_factors(hypernet, embedding: torch.Tensor) -> np.ndarray:
    """One task's generated weights as numpy sees them: every module's A less its shape's fixed part, and B,
    flattened."""
    A, B = hypernet(embedding[None]).task_factors(0)
    fixed = [getattr(hypernet, f"_a0_{_shape_key(shape)}") for shape in hypernet.module_shapes]
    parts = [(a - a0).detach().numpy() for a, a0 in zip(A, fixed, strict=True)] + [b.detach().numpy() for b in B]
    return np.concatenate([part.ravel() for part in parts])


def test_guidance_compares_cosines_of_generated_weights_with_those_at_the_h_embedding():
    """kappa_i = cos(f(e^), f(e_i)) and L_emb = mean_i (cos(f(e_t), f(e_i)) - kappa_i)^2, over every module's A (its
    learned part) and B, against numpy; zero where e_t is e^, and its gradient reaches the task embedding."""
    torch.manual_seed(0)
    hypernet = HyperNetwork(
        [(4, 5), (6, 6), (4, 5)], r=2, task_embedding_dim=3, module_embedding_dim=3, hidden_dim=8, num_layers=1
    )
    for head in hypernet.heads.values():
        torch.nn.init.normal_(head.weight)
    old_embeddings, h_embedding = torch.randn(3, 3), torch.randn(1, 3)
    old = hypernet(old_embeddings)
    old_np = [_all_factors(hypernet, e) for e in old_embeddings]
    h_np = _all_factors(hypernet, h_embedding[0])

    def cos(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    kappa = relation_targets(hypernet(h_embedding), flat_outputs(old))
    np.testing.assert_allclose(kappa.detach().numpy(), [cos(h_np, o) for o in old_np], rtol=1e-5)
    assert guidance_loss(hypernet(h_embedding), flat_outputs(old), kappa).item() == pytest.approx(0.0, abs=1e-10)

    e_t = torch.randn(1, 3, requires_grad=True)
    current = hypernet(e_t)
    loss = guidance_loss(current, flat_outputs(old)[[2, 0]], kappa[[2, 0]])
    now = _all_factors(hypernet, e_t[0])
    expected = np.mean([(cos(now, old_np[i]) - cos(h_np, old_np[i])) ** 2 for i in (2, 0)])
    assert loss.item() == pytest.approx(expected, rel=1e-4) and expected > 1e-4
    loss.backward()
    assert e_t.grad.norm() > 0


def test_guidance_weight_schedule():
    assert [guidance_weight(t, 0.05) for t in (0, 1, 10, 20, 40)] == pytest.approx([0.0, 0.05, 0.5, 1.0, 1.0])
