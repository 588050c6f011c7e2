"""Chunked log-probs / entropies equal the naive full-logits computation, values and gradients."""

import math

import pytest
import torch
from torch import nn

from vlmalign.losses import (
    gather_completion_positions,
    scatter_completion_values,
    selective_log_softmax,
    token_logprobs_from_hidden,
)

N, H, V = 37, 16, 50  # N not a multiple of the chunk size on purpose
CHUNK = 8


def naive(hidden, weight, bias, targets, temperature=1.0):
    logits = (hidden @ weight.T + (bias if bias is not None else 0.0)).float() / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    head = nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
        head.bias.copy_(torch.randn(V, generator=g))
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, head, targets


def test_selective_log_softmax_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, V, generator=g) * 4
    targets = torch.randint(0, V, (N,), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    out = selective_log_softmax(logits, targets, chunk_size=CHUNK)
    assert out.shape == (N,)
    assert torch.allclose(out, expected, atol=1e-6)


def test_selective_log_softmax_by_hand_and_stable():
    logits = torch.tensor([[1000.0, 1001.0, 999.0], [0.5, -1.0, 2.0]])
    out = selective_log_softmax(logits, torch.tensor([1, 0]))
    z0 = math.log(math.exp(-1) + 1 + math.exp(-2))  # logsumexp shifted by 1001
    z1 = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(2.0))
    assert out.tolist() == pytest.approx([-z0, 0.5 - z1], rel=1e-6)


def test_selective_log_softmax_bf16_and_leading_dims():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 5, V, generator=g) * 3).bfloat16()
    targets = torch.randint(0, V, (2, 5), generator=g)
    out = selective_log_softmax(logits, targets, chunk_size=3)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


def test_selective_log_softmax_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    w = torch.randn(N, generator=g)
    (gc,) = torch.autograd.grad((selective_log_softmax(logits, targets, chunk_size=CHUNK) * w).sum(), logits)
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    (gn,) = torch.autograd.grad((ref * w).sum(), logits)
    assert torch.allclose(gc, gn, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_values_and_entropy(temperature):
    hidden, head, targets = make()
    with torch.no_grad():
        logps, entropy = token_logprobs_from_hidden(
            hidden, head, targets, chunk_size=CHUNK, temperature=temperature, with_entropy=True
        )
        exp_logps, exp_entropy = naive(hidden, head.weight, head.bias, targets, temperature)
    assert logps.shape == entropy.shape == (N,)
    assert torch.allclose(logps, exp_logps, atol=1e-5)
    assert torch.allclose(entropy, exp_entropy, atol=1e-5)
    _, none = token_logprobs_from_hidden(hidden, head, targets, chunk_size=CHUNK)
    assert none is None


def test_token_accuracy_comes_from_the_chunked_projection():
    """`with_hits`: argmax hits equal the full logits' argmax (several chunks, about half the targets set to the
    argmax), with and without gradients, and log-probs unchanged."""
    hidden, head, targets = make()
    with torch.no_grad():
        best = head(hidden).argmax(-1)
    targets = torch.where(torch.arange(N) % 2 == 0, best, targets)
    expected = best == targets
    assert 0 < int(expected.sum()) < N
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            logps, entropy, hits = token_logprobs_from_hidden(hidden.requires_grad_(grad), head, targets,
                                                              chunk_size=CHUNK, with_hits=True)
        assert entropy is None and hits.dtype == torch.bool
        assert torch.equal(hits, expected)
        assert torch.allclose(logps, token_logprobs_from_hidden(hidden, head, targets, chunk_size=CHUNK)[0])
    empty = token_logprobs_from_hidden(hidden[:0], head, targets[:0], with_hits=True)
    assert len(empty) == 3 and empty[2].shape == (0,)


def test_entropy_of_uniform_head_is_log_vocab():
    hidden = torch.randn(4, H)
    weight = torch.zeros(V, H)
    logps, entropy = token_logprobs_from_hidden(hidden, weight, torch.arange(4), with_entropy=True)
    assert logps.tolist() == pytest.approx([-math.log(V)] * 4, rel=1e-6)
    assert entropy.tolist() == pytest.approx([math.log(V)] * 4, rel=1e-6)


@pytest.mark.parametrize("head_kind", ["module", "weight_and_bias"])
def test_token_logprobs_gradients_equal_naive(head_kind):
    hidden, head, targets = make(seed=4)
    g = torch.Generator().manual_seed(5)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)

    def grads(fn):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        logps, entropy = fn(h)
        ((logps * w_lp).sum() + (entropy * w_ent).sum()).backward()
        return h.grad, head.weight.grad.clone(), head.bias.grad.clone()

    if head_kind == "module":
        chunked = lambda h: token_logprobs_from_hidden(  # noqa: E731
            h, head, targets, chunk_size=CHUNK, temperature=0.9, with_entropy=True
        )
    else:
        chunked = lambda h: token_logprobs_from_hidden(  # noqa: E731
            h, head.weight, targets, bias=head.bias, chunk_size=CHUNK, temperature=0.9, with_entropy=True
        )
    got = grads(chunked)
    expected = grads(lambda h: naive(h, head.weight, head.bias, targets, 0.9))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_no_full_logits_kept_for_backward():
    """Autograd keeps only the inputs (hidden, head params, targets): no chunk logits survive forward."""
    hidden, head, targets = make(seed=6)
    hidden.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logps, entropy = token_logprobs_from_hidden(hidden, head, targets, chunk_size=CHUNK, with_entropy=True)
    inputs = {_storage(t) for t in (hidden, head.weight, head.bias, targets)}
    extra = sum(t.numel() for t in saved if _storage(t) not in inputs)
    assert extra < N * V  # a non-checkpointed version keeps several [N, V] worth of logits / softmax
    (logps.sum() + entropy.sum()).backward()
    assert hidden.grad is not None and head.weight.grad is not None


def test_gather_and_scatter_completion_positions():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    picked = gather_completion_positions(hidden, mask)
    assert picked.tolist() == [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    values = torch.tensor([-0.5, -1.5, -2.5], requires_grad=True)
    padded = scatter_completion_values(values, mask)
    assert padded.tolist() == [[0.0, -0.5, -1.5], [-2.5, 0.0, 0.0]]
    padded.sum().backward()
    assert values.grad.tolist() == [1.0, 1.0, 1.0]


def test_end_to_end_positions_to_padded_logps():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 4, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logps, _ = token_logprobs_from_hidden(gather_completion_positions(hidden, mask), weight, ids[mask.bool()])
    padded = scatter_completion_values(logps, mask)
    full = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1) * mask
    assert torch.allclose(padded, full, atol=1e-5)


def test_selective_log_softmax_keeps_nothing_large_for_backward():
    logits = torch.randn(N, V, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = selective_log_softmax(logits, targets, chunk_size=CHUNK)
    # only views of the caller's logits and small tensors are kept
    assert sum(t.numel() for t in saved if _storage(t) != _storage(logits)) < N * V
    out.sum().backward()
    assert logits.grad is not None
