"""PruneNet ("You Only Prune Once"): a calibration-free FFN-row policy learned by REINFORCE on the spectra.

One policy, shared by every layer, reads the layer's FFN input matrix (LLaMA-like: gate_proj; OPT: fc1)
and scores its rows (slimgpt.solver.prunenet). It is trained for ``EPISODES`` episodes to keep rows whose
sub-matrix has the singular-value distribution of the whole one (reward 1 / KS statistic); the state with
the lowest total KS is kept, and one more draw with it gives every layer's kept channels. No data, no
forward pass of the LLM, no weight restoration, no heads removed: every layer keeps the same FFN width,
solved so the decoder loses ``--ratio`` of its parameters (equal size with the other methods), so the
pruned model keeps its family's stock config with ``intermediate_size`` (OPT: ``ffn_dim``) = that width.

Four bugs of the authors' code, fixed here (docs/method.md, PruneNet):
1. ``--num_episodes`` and ``--learning_rate_action`` have no ``type=``, so CLI values are strings
   (``range("20")`` fails): here they are typed constants (``EPISODES``, ``LEARNING_RATE``).
2. ``clip_grad_norm_`` runs after ``optimizer.step()`` and ``zero_grad()``, so it clips nothing: here it
   clips before every step.
3. The output is an ``AutoModel`` (no LM head) saved with the dense ``intermediate_size``, so
   ``from_pretrained`` fails on shapes: here the causal LM is saved with the pruned width in its config.
4. The masks depend on the global RNG (``torch.manual_seed``, then ``Uniform.sample`` and
   ``multinomial`` without a generator), so they shift with anything else that draws random numbers:
   here one ``torch.Generator`` seeded with ``--seed`` draws the policy's initial weights, the noise and
   the rows; the global RNG is untouched and the same seed gives the same masks.
Also: the authors prune with the last policy (the best one is only saved to disk), checkpoint on total
reward after the update, and compute log kappa with fresh noise; here the best-KS state that drew its
episode is used, and the log-probability is the one of the drawn action (see slimgpt.solver.prunenet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.methods.base import Decision, LayerMethod, PruneJob, register
from slimgpt.methods.scoring import with_totals
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import model_geometry
from slimgpt.report import PruneReport
from slimgpt.solver.prunenet import (
    EPISODES,
    PolicyResult,
    RowPolicy,
    final_rows,
    ks_statistic,
    spectrum,
    train_policy,
    uniform_ffn_plan,
)
from slimgpt.solver.schedule import SchedulePlan
from slimgpt.solver.scores import drop_columns


def ffn_states(model: nn.Module, adapter: ModelAdapter) -> list[torch.Tensor]:
    """Every layer's FFN input matrix (gate_proj / fc1, d_ff x d, float32): the policy's states."""
    states = [adapter.mlp_inputs(layer)[0].weight.detach().float().cpu() for layer in adapter.decoder_layers(model)]
    if len({tuple(s.shape) for s in states}) != 1:
        raise ConfigError("--method prunenet shares one policy across layers, so every layer needs the same FFN "
                          "width: prune a dense model")
    return states


@register
class PruneNetMethod(LayerMethod):
    """PruneNet: uniform FFN width, rows chosen by a REINFORCE-trained policy on the weights' spectra."""

    name = "prunenet"
    summary = ("PruneNet (\"You Only Prune Once\"): FFN channels chosen by a policy trained with REINFORCE to keep "
               "each layer's\nsingular-value distribution (reward 1/KS), no data, no compensation, no heads "
               "removed; one uniform FFN width,\nso the pruned model has a stock config.")
    help = "PruneNet: policy on FFN weight spectra, uniform FFN width, stock config, no data"
    needs_data = False
    needs_layer_inputs = False
    plan_reads_weights = True
    stock_config = True
    episodes = EPISODES

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        self.kept_rows: dict[int, torch.Tensor] = {}
        self.result: PolicyResult | None = None
        self.final_ks: list[float] = []

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        """The uniform FFN width for ``--ratio``, then the policy's training and the final draw of rows."""
        c = self.config
        schedule = uniform_ffn_plan(model_geometry(model, adapter, c.gqa_policy), c.ratio, c.round_to)
        states = ffn_states(model, adapter)
        ffn, hidden = states[0].shape
        keep = ffn - schedule.layers[0].channels_removed
        if keep == ffn:
            self.kept_rows = {i: torch.arange(ffn) for i in range(len(states))}
            return schedule
        generator = torch.Generator().manual_seed(c.seed)
        policy = RowPolicy(hidden, ffn, generator)
        with torch.enable_grad():
            self.result = train_policy(policy, states, keep, generator, episodes=self.episodes)
        policy.load_state_dict(self.result.best_state)
        rows = final_rows(policy, states, keep, generator)
        self.final_ks = [ks_statistic(spectrum(s), spectrum(s[r])) for s, r in zip(states, rows, strict=True)]
        self.kept_rows = dict(enumerate(rows))
        return schedule

    def prune_attention(self, job: PruneJob) -> Decision:
        return Decision([], job.weight)

    def prune_ffn(self, job: PruneJob) -> Decision:
        kept = set(self.kept_rows[job.layer].tolist())
        removed = [c for c in range(job.units.shape[0]) if c not in kept]
        assert len(removed) == job.rounds, "the plan and the policy's draw disagree on the FFN width"
        return Decision(removed, drop_columns(job.weight, job.units, removed))

    def ratio_convention(self, report: PruneReport) -> str:
        row = report.layers[0] if report.layers else None
        width = f"{row.ffn_kept} of {row.ffn_total}" if row else "unchanged"
        text = (f"PruneNet's compression ratio c = {report.schedule['high']:.3f}: the fraction of every layer's FFN "
                f"channels removed (the paper's convention), a uniform FFN width of {width}, solved to remove "
                f"{with_totals(report)}")
        if self.result is not None:
            n = len(self.final_ks)
            text += (f"; policy from episode {self.result.best_episode + 1} of {len(self.result.history)} (lowest "
                     f"mean KS {self.result.best_ks / n:.4f}), final draw's mean KS {sum(self.final_ks) / n:.4f}")
        return text

    def card_options(self, config: dict[str, Any]) -> str:
        return (f"{self.episodes} REINFORCE episodes, seed {config.get('seed')}, round-to {config.get('round_to')}, "
                "no heads removed, no calibration data")
