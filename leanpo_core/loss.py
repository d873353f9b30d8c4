"""Preference objectives as pure functions over per-sequence log-prob sums and token counts.

LeanPO (Wang et al. 2025, arXiv:2506.05260; docs/method.md section 2), with its baselines SimPO (Meng et al. 2024,
arXiv:2405.14734) and DPO (Rafailov et al. 2023, arXiv:2305.18290). Each takes tensors of shape (B,) for B pairs and
returns a `LossOutput`: the scalar to back-propagate, per-pair losses, chosen and rejected rewards, and the
statistics named as TRL names them (so dashboards built for TRL work) plus LeanPO's own.

Inputs are log-prob *sums* over response tokens with the matching token counts, so one call can form both the
mean-token reward (LeanPO, SimPO) and the token-mean SFT cross-entropy over all winning tokens of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class LossOutput:
    """loss: scalar to minimise; losses, chosen_rewards, rejected_rewards: (B,); metrics: detached floats."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
    }


def displacement_metrics(chosen_rbar: Tensor, rejected_rbar: Tensor, chosen_baseline: Tensor | None,
                         rejected_baseline: Tensor | None) -> dict[str, float]:
    """Likelihood-displacement monitor: `displacement/<side>` = mean(rbar now - rbar before training) for each side
    with a baseline (B,) (the trainer's: the SFT model's rbar of the same response under the same input), in fp64."""
    metrics = {}
    for side, now, base in (("chosen", chosen_rbar, chosen_baseline), ("rejected", rejected_rbar, rejected_baseline)):
        if base is not None:
            metrics[f"displacement/{side}"] = (now.detach().double() - base.double()).mean().item()
    return metrics


def leanpo_loss(
    chosen_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_logps: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    eps: float = 0.1,
    d: float = 0.0,
    smoothing: Literal["symmetric", "conservative"] = "symmetric",
    sft_weight: float = 0.5,
) -> LossOutput:
    """LeanPO: reference-free, mean-token-likelihood reward, dynamic label smoothing, SFT term.

    Args:
        chosen_logps, rejected_logps: (B,) sums of response-token log-probs under the policy.
        chosen_tokens, rejected_tokens: (B,) response token counts (> 0).
        beta, gamma: reward scale and target margin. eps, d: smoothing weight and gate threshold.
        smoothing: "symmetric" (DEFAULT, authors' code) or "conservative" (cDPO / TRL CPO form).
        sft_weight: lambda_sft; CE is the token-mean NLL over all chosen tokens of the batch (`sft_loss`).

    rbar = logps / tokens; Delta = rbar_w - rbar_l; eps_i = eps * 1[Delta < d] (no gradient through the gate);
    symmetric:    L_i = -(1 - eps_i) log s(beta Delta - gamma) - eps_i log s(-beta Delta - gamma)
    conservative: L_i = -(1 - eps_i) log s(beta Delta - gamma) - eps_i log s(-(beta Delta - gamma))
    loss = mean_i L_i + sft_weight * CE.
    """
    chosen_rbar = chosen_logps / chosen_tokens
    rejected_rbar = rejected_logps / rejected_tokens
    delta = chosen_rbar - rejected_rbar
    gate = (delta.detach() < d).to(delta.dtype)
    eps_i = eps * gate
    logits = beta * delta - gamma
    away = -beta * delta - gamma if smoothing == "symmetric" else -logits
    pair_losses = -(1 - eps_i) * F.logsigmoid(logits) - eps_i * F.logsigmoid(away)
    sft = sft_loss(chosen_logps, chosen_tokens).loss
    loss = pair_losses.mean() + sft_weight * sft
    chosen_rewards, rejected_rewards = beta * chosen_rbar, beta * rejected_rbar
    metrics = {
        "loss": loss.item(),
        "loss/pair": pair_losses.detach().mean().item(),
        "loss/sft": sft.detach().item(),
        **_reward_metrics(chosen_rewards, rejected_rewards),
        "logps/chosen": chosen_rbar.detach().mean().item(),
        "logps/rejected": rejected_rbar.detach().mean().item(),
        "label_smoothing/active_fraction": gate.mean().item() if eps > 0 else 0.0,
    }
    return LossOutput(loss, pair_losses, chosen_rewards, rejected_rewards, metrics)


def simpo_loss(
    chosen_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_logps: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> LossOutput:
    """SimPO: L_i = -log s(beta (rbar_w - rbar_l) - gamma), rbar the mean token log-prob. Shapes as leanpo_loss."""
    chosen_rewards = beta * chosen_logps / chosen_tokens
    rejected_rewards = beta * rejected_logps / rejected_tokens
    pair_losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    loss = pair_losses.mean()
    metrics = {
        "loss": loss.item(),
        "loss/pair": loss.item(),
        **_reward_metrics(chosen_rewards, rejected_rewards),
        "logps/chosen": (chosen_rewards / beta).detach().mean().item(),
        "logps/rejected": (rejected_rewards / beta).detach().mean().item(),
    }
    return LossOutput(loss, pair_losses, chosen_rewards, rejected_rewards, metrics)


def dpo_loss(
    chosen_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_logps: Tensor,
    rejected_tokens: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (sigmoid): rewards beta (log pi - log pi_ref) over summed response log-probs; a frozen reference.

    L_i = -(1 - ls) log s(r_w - r_l) - ls log s(-(r_w - r_l)). Token counts only feed the mean-log-prob metrics
    (`logps/*` are mean token log-probs in every objective, so curves compare across objectives).
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    margin = chosen_rewards - rejected_rewards
    pair_losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    loss = pair_losses.mean()
    chosen_rbar, rejected_rbar = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens
    metrics = {
        "loss": loss.item(),
        "loss/pair": loss.item(),
        **_reward_metrics(chosen_rewards, rejected_rewards),
        "logps/chosen": chosen_rbar.detach().mean().item(),
        "logps/rejected": rejected_rbar.detach().mean().item(),
    }
    return LossOutput(loss, pair_losses, chosen_rewards, rejected_rewards, metrics)


def sft_loss(chosen_logps: Tensor, chosen_tokens: Tensor, rejected_logps: Tensor | None = None,
             rejected_tokens: Tensor | None = None) -> LossOutput:
    """SFT on the chosen responses: CE = -sum(chosen log-probs) / sum(chosen tokens), the token-mean NLL over every
    chosen token of the batch (LeanPO's lambda_sft term). Per-pair losses are -rbar_w; the rewards are the mean
    token log-probs; the rejected side (when given with tokens > 0) only feeds `logps/rejected`."""
    ce = -chosen_logps.sum() / chosen_tokens.sum()
    chosen_rbar = chosen_logps / chosen_tokens
    metrics = {"loss": ce.item(), "loss/sft": ce.item(), "logps/chosen": chosen_rbar.detach().mean().item()}
    rejected_rbar = torch.full_like(chosen_rbar, float("nan"))
    if rejected_logps is not None and bool((rejected_tokens > 0).all()):
        rejected_rbar = rejected_logps / rejected_tokens
        metrics["logps/rejected"] = rejected_rbar.detach().mean().item()
    return LossOutput(ce, -chosen_rbar, chosen_rbar, rejected_rbar, metrics)
