"""The batched linear base learner must be the per-episode computation, in every mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl.stats import mean_ci95
from mtl.base_learner import adapt_linear, embed, episode_accuracy, evaluate_encoder, evaluate_episodes

WAY, SHOT, QUERY, DIM, E = 5, 2, 3, 12, 7



def loop_adapt(feats, targets, weight, bias, steps, lr):
    """Reference: one episode, autograd on F.cross_entropy, plain SGD (as the MTL reference code)."""
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(feats, weight, bias), targets)
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
        weight, bias = weight - lr * grad_w, bias - lr * grad_b
    return weight.detach(), bias.detach()


def episode_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(E, WAY * SHOT, DIM, generator=g)
    query = torch.randn(E, WAY * QUERY, DIM, generator=g)
    centres = torch.randn(E, WAY, 1, DIM, generator=g) * 2
    support = support + centres.repeat_interleave(SHOT, 1).squeeze(2)
    query = query + centres.repeat_interleave(QUERY, 1).squeeze(2)
    return support, torch.arange(WAY).repeat_interleave(SHOT), query, torch.arange(WAY).repeat_interleave(QUERY)


def test_batched_equals_loop_with_given_init():
    support, s_t, query, q_t = episode_data()
    init_w, init_b = torch.randn(WAY, DIM) * 0.1, torch.randn(WAY) * 0.1
    w, b = adapt_linear(support, s_t, WAY, init_weight=init_w, init_bias=init_b, steps=50, lr=0.1)
    accs = episode_accuracy(query, q_t, w, b)
    for e in range(E):
        lw, lb = loop_adapt(support[e], s_t, init_w, init_b, 50, 0.1)
        torch.testing.assert_close(w[e], lw, atol=1e-5, rtol=0)
        torch.testing.assert_close(b[e], lb, atol=1e-5, rtol=0)
        loop_acc = (F.linear(query[e], lw, lb).argmax(1) == q_t).float().mean()
        assert abs(accs[e].item() - loop_acc.item()) < 1e-5


def test_batched_equals_loop_with_seeded_fresh_init():
    support, s_t, query, q_t = episode_data(1)
    w, b = adapt_linear(support, s_t, WAY, steps=100, lr=0.01, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    for e in range(E):
        init_w = torch.nn.init.kaiming_normal_(torch.empty(WAY, DIM), generator=g)
        lw, lb = loop_adapt(support[e], s_t, init_w, torch.zeros(WAY), 100, 0.01)
        torch.testing.assert_close(w[e], lw, atol=1e-5, rtol=0)
        torch.testing.assert_close(b[e], lb, atol=1e-5, rtol=0)


def test_evaluation_runs_without_autograd():
    support, s_t, _, _ = episode_data()
    init_w = torch.randn(WAY, DIM, requires_grad=True)
    w, b = adapt_linear(support.requires_grad_(), s_t, WAY, init_weight=init_w, steps=3)
    assert not w.requires_grad and not b.requires_grad


def test_first_order_gradient_treats_inner_gradients_as_constants():
    support, s_t, query, q_t = episode_data(2)
    support, query = support[:1].requires_grad_(), query[:1].requires_grad_()
    init_w = (torch.randn(WAY, DIM) * 0.1).requires_grad_()
    init_b = torch.zeros(WAY, requires_grad=True)
    w, b = adapt_linear(support, s_t, WAY, init_weight=init_w, init_bias=init_b, steps=10, lr=0.1,
                        create_graph=True, first_order=True)
    loss = F.cross_entropy(F.linear(query[0], w[0], b[0]), q_t)
    g_init, g_query = torch.autograd.grad(loss, (init_w, query))
    assert support.grad is None and not torch.autograd.grad(w.sum(), support, allow_unused=True)[0]
    # Reference: adapt on detached support; dLoss/dinit = dLoss/dW_adapted (identity Jacobian).
    lw, lb = loop_adapt(support[0].detach(), s_t, init_w.detach(), init_b.detach(), 10, 0.1)
    lw.requires_grad_()
    ref_loss = F.cross_entropy(F.linear(query[0].detach(), lw, lb), q_t)
    torch.testing.assert_close(g_init, torch.autograd.grad(ref_loss, lw)[0], atol=1e-6, rtol=1e-4)
    assert g_query.abs().sum() > 0


def test_second_order_matches_autograd_through_the_loop():
    support, s_t, query, q_t = episode_data(3)
    support = support[:1].clone().requires_grad_()
    init_w = (torch.randn(WAY, DIM) * 0.1).requires_grad_()
    init_b = torch.zeros(WAY, requires_grad=True)
    w, b = adapt_linear(support, s_t, WAY, init_weight=init_w, init_bias=init_b, steps=5, lr=0.1,
                        create_graph=True, first_order=False)
    loss = F.cross_entropy(F.linear(query[0], w[0], b[0]), q_t)
    got = torch.autograd.grad(loss, (init_w, support))
    weight, bias = init_w, init_b  # reference: the MAML inner loop with create_graph=True
    for _ in range(5):
        inner = F.cross_entropy(F.linear(support[0], weight, bias), s_t)
        gw, gb = torch.autograd.grad(inner, (weight, bias), create_graph=True)
        weight, bias = weight - 0.1 * gw, bias - 0.1 * gb
    want = torch.autograd.grad(F.cross_entropy(F.linear(query[0], weight, bias), q_t), (init_w, support))
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, atol=1e-6, rtol=1e-4)


def test_evaluate_episodes_is_chunk_invariant_and_matches_direct():
    rng = np.random.default_rng(0)
    feats = torch.randn(40, DIM)
    support = rng.integers(0, 40, size=(E, WAY * SHOT))
    query = rng.integers(0, 40, size=(E, WAY * QUERY))
    whole = evaluate_episodes(feats, (support, query), WAY, SHOT, QUERY, steps=20,
                              generator=torch.Generator().manual_seed(0))
    chunked = evaluate_episodes(feats, (support, query), WAY, SHOT, QUERY, steps=20, chunk=2,
                                generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(whole, chunked, atol=1e-6)
    s_t, q_t = torch.arange(WAY).repeat_interleave(SHOT), torch.arange(WAY).repeat_interleave(QUERY)
    w, b = adapt_linear(feats[support], s_t, WAY, steps=20, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(whole, episode_accuracy(feats[query], q_t, w, b).numpy(), atol=1e-6)
    assert whole.shape == (E,)
    mean, ci = mean_ci95(np.array([0.5, 0.7]))
    assert mean == pytest.approx(0.6) and ci == pytest.approx(1.96 * 0.1 / np.sqrt(2))


class MeanColour(torch.nn.Module):
    """A tiny 'encoder' with BN, to check eval mode is used and restored."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x).mean(dim=(2, 3))


def test_embed_batches_in_eval_mode_and_restores_mode():
    from mtl.data.transforms import EvalTransform

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 20, 20, 3), dtype=np.uint8)
    encoder, transform = MeanColour().train(), EvalTransform(16)
    feats = embed(encoder, images, transform, inference_batch_size=3, device="cpu")
    assert feats.shape == (10, 3) and feats.dtype == torch.float32 and not feats.requires_grad
    assert encoder.training and encoder.bn.num_batches_tracked.item() == 0
    picked = embed(encoder, images, transform, inference_batch_size=4, device="cpu",
                   indices=np.array([9, 2]))
    torch.testing.assert_close(picked, feats[[9, 2]])
    labels = np.repeat(np.arange(5), 2)
    support, query = np.arange(0, 10, 2)[None], np.arange(1, 10, 2)[None]
    accs = evaluate_encoder(encoder, images, (support, query), transform, 5, 1, 1, steps=5,
                            generator=torch.Generator().manual_seed(0))
    w, b = adapt_linear(feats[support], torch.arange(5), 5, steps=5, generator=torch.Generator().manual_seed(0))
    assert labels[support].tolist() == [[0, 1, 2, 3, 4]]
    np.testing.assert_allclose(accs, episode_accuracy(feats[query], torch.arange(5), w, b).numpy())
