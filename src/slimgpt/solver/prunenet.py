"""PruneNet's maths: the shared row policy, singular-value spectra, the two-sample KS statistic, the
REINFORCE loop that trains the policy, and the uniform FFN width that hits a parameter target.

The policy (one for every layer) reads a layer's FFN input matrix S (d_ff x d: LLaMA's gate_proj, OPT's
fc1) and gives every row a keep-probability:

    alpha = sigmoid((S P^T + b) r),   kappa = sigmoid(logit(u) + logit(alpha)),  u ~ U(0, 1)

with P (d_ff x d), b (d_ff) a linear layer and r (d_ff) a vector. (S P^T + b) r is computed as
S (P^T r) + (b . r): the same value, d_ff * d work instead of the d_ff^2 * d of the d_ff x d_ff product.
An action keeps ``keep`` rows drawn without replacement with probability proportional to kappa; its
reward is 1 / KS(spectrum(S), spectrum(S[kept])), or ``ZERO_KS_REWARD`` when the statistic is 0.
Every random draw comes from one ``torch.Generator``: the same seed gives the same policy and masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slimgpt.errors import ConfigError
from slimgpt.solver.schedule import LayerGeometry, LayerPlan, SchedulePlan

ZERO_KS_REWARD = 99999.0  # the authors' reward when the two spectra have the same distribution
EPISODES = 20  # the paper's policy-training episodes
LEARNING_RATE = 1e-3  # AdamW, as the authors
GAMMA = 0.99  # the reward of layer l is discounted by GAMMA ** l
CLIP_NORM = 1.0  # gradient-norm clip before every step


def spectrum(weight: torch.Tensor) -> torch.Tensor:
    """The singular values of ``weight`` (float32)."""
    return torch.linalg.svdvals(weight.detach().float())


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| of two 1-D samples."""
    a, b = a.detach().double().sort().values, b.detach().double().sort().values
    pooled = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, pooled, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, pooled, right=True).double() / b.numel()
    return float((cdf_a - cdf_b).abs().max())


def ks_reward(ks: float) -> float:
    return ZERO_KS_REWARD if ks == 0 else 1.0 / ks


class RowPolicy(nn.Module):
    """The shared policy: P (``weight``), b (``bias``) of a linear map d -> d_ff and r (``rows``), from ``generator``.

    P and b are uniform in +-1/sqrt(d) (nn.Linear's default range), r uniform in [0, 1) (the authors' rand).
    """

    def __init__(self, hidden: int, ffn: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = hidden ** -0.5  # nn.Linear would draw its initial weights from the global RNG: not used
        self.weight = nn.Parameter((torch.rand(ffn, hidden, generator=generator) * 2 - 1) * bound)
        self.bias = nn.Parameter((torch.rand(ffn, generator=generator) * 2 - 1) * bound)
        self.rows = nn.Parameter(torch.rand(ffn, generator=generator))

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """logit(alpha) = (S P^T + b) r, one per row of ``state``."""
        return state @ (self.weight.t() @ self.rows) + self.bias @ self.rows

    def log_keep(self, state: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """log kappa, the Concrete keep-probabilities for the uniform ``noise``."""
        return nn.functional.logsigmoid(torch.logit(noise) + self.logits(state))


def draw_noise(rows: int, generator: torch.Generator) -> torch.Tensor:
    """u ~ U(0, 1), kept away from 0 and 1 so logit(u) is finite."""
    eps = 1e-6
    return torch.rand(rows, generator=generator).clamp(eps, 1 - eps)


def sample_rows(log_keep: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor:
    """``keep`` row indices drawn without replacement with probability proportional to kappa, sorted."""
    probs = log_keep.detach().exp().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.multinomial(probs, keep, replacement=False, generator=generator).sort().values


@dataclass
class PolicyResult:
    """The policy state with the lowest total KS statistic over the episodes, and the training record.

    history: per episode, the total KS statistic (over layers) of the actions the policy drew, and
    their mean reward. best_state produced the actions of ``history[best_episode]``.
    """

    best_state: dict[str, torch.Tensor]
    best_episode: int
    best_ks: float
    history: list[tuple[float, float]] = field(default_factory=list)


class BestCheckpoint:
    """Keeps a copy of the state with the lowest score offered (ties keep the earliest)."""

    def __init__(self) -> None:
        self.score = float("inf")
        self.episode = -1
        self.state: dict[str, torch.Tensor] = {}

    def offer(self, episode: int, score: float, state: dict[str, torch.Tensor]) -> bool:
        if not score < self.score:
            return False
        self.score, self.episode = score, episode
        self.state = {k: v.detach().clone() for k, v in state.items()}
        return True


def train_policy(policy: RowPolicy, states: Sequence[torch.Tensor], keep: int, generator: torch.Generator,
                 episodes: int = EPISODES, lr: float = LEARNING_RATE, gamma: float = GAMMA) -> PolicyResult:
    """REINFORCE on the spectra of ``states`` (every layer's d_ff x d FFN input matrix), keeping ``keep`` rows.

    Per episode: every layer draws its noise and rows with the current policy and gets its KS reward; then,
    layer by layer (as the authors' code), loss_l = -gamma^l R_l sum_{kept} log kappa_j with the same noise
    that drew the action, one clipped AdamW step each. The state that drew the episode with the lowest
    total KS is checkpointed before it is updated.
    """
    spectra = [spectrum(s) for s in states]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    best = BestCheckpoint()
    history: list[tuple[float, float]] = []
    for episode in range(episodes):
        drawn = []
        with torch.no_grad():
            for state, full in zip(states, spectra, strict=True):
                noise = draw_noise(state.shape[0], generator)
                rows = sample_rows(policy.log_keep(state, noise), keep, generator)
                drawn.append((noise, rows, ks_statistic(full, spectrum(state[rows]))))
        total_ks = sum(ks for _, _, ks in drawn)
        history.append((total_ks, sum(ks_reward(ks) for _, _, ks in drawn) / len(drawn)))
        best.offer(episode, total_ks, policy.state_dict())
        for index, (state, (noise, rows, ks)) in enumerate(zip(states, drawn, strict=True)):
            loss = -(gamma ** index) * ks_reward(ks) * policy.log_keep(state, noise)[rows].sum()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), CLIP_NORM)
            optimizer.step()
            optimizer.zero_grad()
    return PolicyResult(best.state, best.episode, best.score, history)


def final_rows(policy: RowPolicy, states: Sequence[torch.Tensor], keep: int,
               generator: torch.Generator) -> list[torch.Tensor]:
    """One more draw per layer with ``policy``: the rows every layer keeps (sorted)."""
    with torch.no_grad():
        return [sample_rows(policy.log_keep(s, draw_noise(s.shape[0], generator)), keep, generator) for s in states]


def uniform_ffn_plan(geometries: list[LayerGeometry], target: float, round_to: int = 1) -> SchedulePlan:
    """Every layer keeps the same FFN width W (a multiple of ``round_to``) and all its heads; W is the
    width whose removed parameters come closest to ``target`` of the decoder's."""
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"pruning ratio {target} is outside [0, 1): pass --ratio between 0 and 0.95")
    total = sum(g.layer_params for g in geometries)
    goal = target * total
    narrowest = min(g.ffn_channels for g in geometries)
    step = max(round_to, 1)

    def removed(width: int) -> int:
        return sum((g.ffn_channels - width) * g.params_per_channel for g in geometries)

    widths = [w for w in range(step, narrowest + 1, step)] or [narrowest]
    if target > 0 and removed(widths[0]) < goal:
        raise ConfigError(
            f"cannot remove {target:.1%} of decoder parameters from the FFN alone (at most "
            f"{removed(widths[0]) / total:.1%} at a uniform width of {widths[0]} channels): lower --ratio"
        )
    width = narrowest if target == 0 else min(reversed(widths), key=lambda w: abs(removed(w) - goal))
    layers = [LayerPlan(1 - width / g.ffn_channels, 0, g.ffn_channels - width,
                        (g.ffn_channels - width) * g.params_per_channel) for g in geometries]
    ratio = 1 - width / narrowest
    return SchedulePlan(layers=layers, target_ratio=target, realised_ratio=removed(width) / total, high=ratio,
                        low=ratio, schedule="uniform", total_params=total, params_removed=removed(width))
