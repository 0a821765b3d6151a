"""The sensitivity's KL from final hidden states (slimgpt.methods.auto_divergence) against the full head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimgpt.methods.auto_divergence import TopKDivergence, linear_head


def _exact(weight: torch.Tensor, final: torch.Tensor, changed: torch.Tensor) -> float:
    p = torch.log_softmax((final @ weight.T).double(), -1)
    q = torch.log_softmax((changed @ weight.T).double(), -1)
    return float((p.exp() * (p - q)).sum()) / len(final)


def _case(vocab: int = 400, d: int = 24, tokens: int = 60, peak: float = 3.0,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g)
    final = peak * torch.randn(tokens, d, generator=g) / d ** 0.5
    changed = [final + scale * torch.randn(tokens, d, generator=g) / d ** 0.5 for scale in (0.02, 0.1, 0.3)]
    return weight, final, changed


def test_every_token_summed_is_the_exact_kl() -> None:
    weight, final, changed = _case()
    divergence = TopKDivergence(weight, final, final @ weight.T, top_k=len(weight))
    assert bool(divergence.exact_in.all())
    for got, x in zip(divergence(changed), changed, strict=True):
        assert got == pytest.approx(_exact(weight, final, x), rel=1e-4)


@pytest.mark.parametrize("top_k", [8, 40, 200])
def test_a_tail_is_close(top_k: int) -> None:
    """The tail's term, from its exact mean change and a shared covariance, leaves the KL within a small
    fraction of the exact one, however much mass the tail has."""
    weight, final, changed = _case()
    divergence = TopKDivergence(weight, final, final @ weight.T, top_k=top_k)
    tail = float(divergence.tail.mean())
    assert 0 < tail < 1
    for got, x in zip(divergence(changed), changed, strict=True):
        assert got == pytest.approx(_exact(weight, final, x), rel=0.05)


def test_without_the_tail_correction_a_tail_underestimates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The correction is what closes the gap: with the tail at its mean change alone (no variance), the KL
    is below the exact one (Jensen), by more than the corrected one is off."""
    import slimgpt.methods.auto_divergence as module

    weight, final, changed = _case()
    corrected = TopKDivergence(weight, final, final @ weight.T, top_k=8)(changed)
    d = weight.shape[1]
    monkeypatch.setattr(module, "_tail_covariance", lambda *_: torch.zeros(d, d, dtype=torch.float64))
    plain = TopKDivergence(weight, final, final @ weight.T, top_k=8)(changed)
    for fixed, low, x in zip(corrected, plain, changed, strict=True):
        exact = _exact(weight, final, x)
        assert low < exact * (1 - 1e-3)
        assert abs(fixed - exact) < abs(low - exact)


def test_the_gathering_chunks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import slimgpt.methods.auto_divergence as module

    weight, final, changed = _case()
    whole = TopKDivergence(weight, final, final @ weight.T, top_k=40)(changed)
    monkeypatch.setattr(module, "GATHER_BUDGET", 7 * 40 * weight.shape[1])  # 7 tokens a chunk
    chunked = TopKDivergence(weight, final, final @ weight.T, top_k=40)
    assert chunked.chunk == 7
    assert chunked(changed) == pytest.approx(whole, rel=1e-6)


class _Scaled(nn.Module):
    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.head(x)


class _Model(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_the_head_check_refuses_what_is_not_the_linear_head() -> None:
    linear = nn.Linear(24, 400, bias=True)
    final = torch.randn(10, 24)
    with torch.no_grad():
        logits = linear(final)
        found = linear_head(_Model(linear), final, logits)
        assert found is not None and torch.equal(found, linear.weight)
        assert linear_head(_Model(linear), final, 2 * logits) is None  # a scale or soft cap on the logits
        assert linear_head(_Model(_Scaled(linear)), final, logits) is None  # not a plain linear head
