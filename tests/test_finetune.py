"""Test-time fine-tuning (ft_last, ft_all): what adapts, that the batched computation equals a
per-episode autograd loop, that it reduces to ft when the network's step is 0, and that the
workflow's evaluate scores it on the shared episode file."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl.data.episodes import write_test_episodes
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import EvalTransform
from mtl.evaluate import evaluate
from mtl.data.episodes import relabel
from mtl.learners import score_episodes
from mtl.learners.finetune import (
    FinetuneLearner,
    adapt_on_support,
    adapted_parameter_names,
    episodes_per_chunk,
    query_features,
)
from mtl.models import build_backbone, save_encoder
from mtl.rng import Purpose, torch_stream
from mtl.base_learner import evaluate_encoder, fresh_init

WAY, SHOT, QUERY, EPISODES, SIZE = 3, 2, 3, 5, 16
NORMALIZE = {"mean": [0.5] * 3, "std": [0.25] * 3}
STEPS, LR = 5, 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_split):
    folder = tmp_path_factory.mktemp("finetune")
    split = tiny_split(folder / "test.h5", classes=4, per_class=8, size=SIZE, noise=60)
    episodes = write_test_episodes(split, folder / "episodes.npz", way=WAY, shot=SHOT, query=QUERY, count=EPISODES, seed=3)
    torch.manual_seed(0)
    encoder = build_backbone("resnet12", width=0.125).eval()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model = save_encoder(encoder, folder / "encoder.pt", image_size=SIZE, normalize=NORMALIZE)
    import mtl.data.episodes as ep

    loaded = ep.load_episodes(episodes)
    return {"folder": folder, "split": split, "episodes": episodes, "encoder": encoder, "model": model,
            "arrays": (loaded.support, loaded.query), "images": HDF5Split(split, in_memory=True)}


def run(setup, scope, encoder_lr, chunk=None, seed=7):
    """Per-episode accuracies of the fine-tuning learner on the saved episodes (``chunk`` episodes
    adapted together; None: the learner's own choice)."""
    learner = FinetuneLearner(setup["encoder"], scope, steps=STEPS, lr=LR, encoder_lr=encoder_lr, seed=seed)
    if chunk is not None:
        learner.episodes_per_chunk = lambda *_: chunk
    logits = score_episodes(learner, setup["images"], setup["arrays"], EvalTransform(SIZE, **NORMALIZE),
                            WAY, SHOT, QUERY)
    return (logits.argmax(dim=-1).numpy() == relabel(WAY, QUERY)).mean(axis=1)


def learner_draws():
    """The fresh learners' draws of the run seed 7, in episode order (what the learner starts from)."""
    return torch_stream(7, Purpose.TEST_LEARNERS)


@pytest.mark.parametrize("scope", ["last", "all"])
def test_with_a_frozen_network_it_is_ft(setup, scope):
    expected = evaluate_encoder(setup["encoder"], setup["images"], setup["arrays"], EvalTransform(SIZE, **NORMALIZE),
                                WAY, SHOT, QUERY, steps=STEPS, lr=LR, generator=learner_draws())
    np.testing.assert_allclose(run(setup, scope, encoder_lr=0.0), expected, atol=1e-6)


@pytest.mark.parametrize("scope", ["last", "all"])
def test_chunking_changes_nothing_and_leaves_the_encoder_untouched(setup, scope):
    state = {k: v.clone() for k, v in setup["encoder"].state_dict().items()}
    one_by_one, together, sized = (run(setup, scope, 0.05, chunk=c) for c in (1, 4, None))
    np.testing.assert_allclose(one_by_one, together, atol=1e-6)
    np.testing.assert_allclose(one_by_one, sized, atol=1e-6)
    for key, value in setup["encoder"].state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.requires_grad for p in setup["encoder"].parameters())


def test_chunks_are_sized_to_the_memory_budget(setup):
    """ResNet-12 at width 0.125, 16 px, ft_all: the layers' outputs of one image sum to a known size;
    the chunk is the budget over 3 x that x the support size."""
    encoder, image = setup["encoder"], torch.zeros(1, 3, SIZE, SIZE)
    per_image = episodes_per_chunk(encoder, "all", image, support_size=1, budget=10**12)
    assert episodes_per_chunk(encoder, "all", image, support_size=2, budget=10**12) == per_image // 2
    bytes_per_image = 10**12 / per_image / 3
    assert 100_000 < bytes_per_image < 1_000_000  # ~10 layer outputs of 8x16x16 .. 64x2x2 floats each
    assert episodes_per_chunk(encoder, "all", image, support_size=6, budget=1) == 1  # never 0
    last = episodes_per_chunk(encoder, "last", encoder.forward_trunk(image), support_size=1, budget=10**12)
    assert last > per_image  # the last block alone holds fewer activations


def test_ft_last_adapts_the_last_block_and_ft_all_every_parameter(setup):
    encoder = setup["encoder"]
    last = adapted_parameter_names(encoder, "last")
    assert last and all(name.startswith("layer4.") for name in last)
    assert {n for n, _ in encoder.named_parameters() if n.startswith("layer4.")} == set(last)
    assert adapted_parameter_names(encoder, "all") == [n for n, _ in encoder.named_parameters()]

    torch.manual_seed(1)
    x = torch.randn(2, WAY * SHOT, 3, SIZE, SIZE)
    y = torch.arange(WAY).repeat_interleave(SHOT)
    for scope, inputs in (("last", encoder.forward_trunk(x.flatten(0, 1)).unflatten(0, (2, WAY * SHOT))), ("all", x)):
        weight, bias = fresh_init(2, WAY, encoder.out_dim, generator=torch.Generator().manual_seed(0))
        params, _, _ = adapt_on_support(encoder, scope, inputs.detach(), y, weight, bias, steps=3, lr=LR,
                                        encoder_lr=0.05)
        assert list(params) == adapted_parameter_names(encoder, scope)
        own = dict(encoder.named_parameters())
        for name, value in params.items():
            assert value.shape == (2, *own[name].shape)
            for episode in range(2):  # every adapted parameter moved, in each episode separately
                assert not torch.equal(value[episode], own[name].detach()), (scope, name)


def test_batched_adaptation_equals_a_per_episode_autograd_loop(setup):
    """Reference: per episode, a copy of the network, plain SGD with autograd on the last block + learner."""
    encoder = setup["encoder"]
    torch.manual_seed(2)
    x = torch.randn(3, WAY * SHOT, 3, SIZE, SIZE)
    query_x = torch.randn(3, WAY * QUERY, 3, SIZE, SIZE)
    y = torch.arange(WAY).repeat_interleave(SHOT)
    weight, bias = fresh_init(3, WAY, encoder.out_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trunk = encoder.forward_trunk(x.flatten(0, 1)).unflatten(0, (3, WAY * SHOT))
        query_trunk = encoder.forward_trunk(query_x.flatten(0, 1)).unflatten(0, (3, WAY * QUERY))
    params, w_all, b_all = adapt_on_support(encoder, "last", trunk, y, weight, bias, steps=4, lr=LR, encoder_lr=0.03)
    feats = query_features(encoder, "last", params, query_trunk)
    for e in range(3):
        net = copy.deepcopy(encoder).eval()
        block = list(net.layer4.parameters())
        w, b = weight[e].clone().requires_grad_(), bias[e].clone().requires_grad_()
        for _ in range(4):
            loss = F.cross_entropy(net.forward_head(trunk[e]) @ w.T + b, y)
            grads = torch.autograd.grad(loss, block + [w, b])
            with torch.no_grad():
                for p, g in zip(block, grads[:-2]):
                    p -= 0.03 * g
            w, b = w - LR * grads[-2], b - LR * grads[-1]
        torch.testing.assert_close(w_all[e], w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b_all[e], b, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(feats[e], net.forward_head(query_trunk[e]), rtol=1e-4, atol=1e-5)


def finetune_whole_network(encoder, support_x, support_y, weight, bias, *, steps, lr, encoder_lr):
    """Reference ft_all for one episode: a copy of the network (BN in eval mode), plain SGD with
    autograd on every network parameter at ``encoder_lr`` and on the learner at ``lr``."""
    net = copy.deepcopy(encoder).eval()
    params = [p.requires_grad_() for p in net.parameters()]
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    for _ in range(steps):
        loss = F.cross_entropy(net(support_x) @ w.T + b, support_y)
        grads = torch.autograd.grad(loss, params + [w, b])
        with torch.no_grad():
            for p, g in zip(params, grads[:-2]):
                p -= encoder_lr * g
        w, b = (w - lr * grads[-2]).detach().requires_grad_(), (b - lr * grads[-1]).detach().requires_grad_()
    return net, w.detach(), b.detach()


def test_batched_ft_all_equals_a_per_episode_autograd_loop(setup):
    """ft_all's batched adaptation (vmap of grad over episodes, every parameter) against the plain loop:
    the adapted learners, every adapted network parameter and the query features, episode by episode."""
    encoder = setup["encoder"]
    torch.manual_seed(3)
    x = torch.randn(3, WAY * SHOT, 3, SIZE, SIZE)
    query_x = torch.randn(3, WAY * QUERY, 3, SIZE, SIZE)
    y = torch.arange(WAY).repeat_interleave(SHOT)
    weight, bias = fresh_init(3, WAY, encoder.out_dim, generator=torch.Generator().manual_seed(0))
    params, w_all, b_all = adapt_on_support(encoder, "all", x, y, weight, bias, steps=4, lr=LR, encoder_lr=0.03)
    feats = query_features(encoder, "all", params, query_x)
    for e in range(3):
        net, w, b = finetune_whole_network(encoder, x[e], y, weight[e], bias[e], steps=4, lr=LR, encoder_lr=0.03)
        torch.testing.assert_close(w_all[e], w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b_all[e], b, rtol=1e-4, atol=1e-5)
        adapted = dict(net.named_parameters())
        assert set(params) == set(adapted)
        for name, value in params.items():
            torch.testing.assert_close(value[e], adapted[name].detach(), rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(feats[e], net(query_x[e]), rtol=1e-4, atol=1e-5)


def test_ft_all_accuracies_equal_a_per_episode_autograd_loop(setup):
    """The ft_all learner on the saved episodes against the plain loop on the same images,
    each episode with the fresh learner drawn next from the same generator."""
    encoder, images, (support, query) = setup["encoder"], setup["images"], setup["arrays"]
    transform = EvalTransform(SIZE, **NORMALIZE)
    encoder_lr = 0.05
    got = run(setup, "all", encoder_lr, chunk=2)
    generator = learner_draws()
    support_y = torch.arange(WAY).repeat_interleave(SHOT)
    query_y = torch.arange(WAY).repeat_interleave(QUERY)
    expected = []
    for e in range(len(support)):
        weight, bias = fresh_init(1, WAY, encoder.out_dim, generator=generator)
        net, w, b = finetune_whole_network(encoder, transform(images.get_images(support[e])), support_y, weight[0],
                                           bias[0], steps=STEPS, lr=LR, encoder_lr=encoder_lr)
        with torch.no_grad():
            logits = net(transform(images.get_images(query[e]))) @ w.T + b
        expected.append((logits.argmax(dim=1) == query_y).double().mean().item())
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # the network's step matters here: with it at 0 (ft) some episode scores otherwise
    assert not np.allclose(run(setup, "all", 0.0), expected)


# Three evaluations at the methods' own 100 steps (10 s, ft_all most of it): in the full suite (CI);
# the quick loop keeps evaluate's fine-tuning path through tests/test_predict.py's ft_last contract.
@pytest.mark.slow
def test_evaluate_scores_ft_last_on_the_shared_episode_file(setup):
    folder = setup["folder"]
    digests = {}
    for method in ("ft", "ft_last", "ft_all"):
        evaluate(method, setup["model"], setup["split"], setup["episodes"], episodes_out=folder / f"{method}.csv",
                 metrics_out=folder / f"{method}.json", protocol={"dataset": "toy", "backbone": "resnet12", "seed": 7},
                 device="cpu")
        metrics = json.loads((folder / f"{method}.json").read_text())
        assert metrics["method"] == method and metrics["episodes"] == EPISODES
        digests[method] = metrics["episodes_sha256"]
    assert len(set(digests.values())) == 1
