"""Loss names and their knobs (the `loss` section of the config), shared by every implementation."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pretrain_kernels.vmf_normaliser import APPROXIMATIONS

# The names LossConfig.name accepts; the engine passes one of them as `kind`.
LOSS_NAMES = (
    "cosine",
    "l2",
    "l2_raw",
    "vmf",
    "vmf_reg1",
    "vmf_reg2",
    "vmf_practice",
    "margin",
    "syn_margin_orth",
    "syn_margin_diff",
)
VMF_LOSSES = ("vmf", "vmf_reg1", "vmf_reg2", "vmf_practice")
# Losses that read table rows besides the targets' (a search for negatives over the whole table): a
# learned table must be handed to them whole, and its gradient is dense.
WHOLE_TABLE_LOSSES = ("margin",)
REDUCTIONS = ("mean", "sum", "none")
# Norm clamp: x / max(‖x‖, EPS), as torch.nn.functional.normalize does.
EPS = 1e-8
# Syn-margins: below this ‖r‖ (μ within ~1e-4 rad of ±ê_t) float32 cannot resolve the synthetic
# negative's direction, so μ·u contributes no slope there (kernel and reference alike).
SYN_SLOPE_FLOOR = 1e-4


@dataclass(frozen=True)
class LossParams:
    """Knobs of the losses; defaults equal LossConfig's."""

    vmf_exact: bool = False  # exact Bessel normaliser (host round trip) instead of a closed form
    vmf_approx: str = "debye"  # closed form of log C_m: debye | paper | paper_fixed
    vmf_lambda1: float = 0.02  # vmf_reg1: + λ1·‖ê‖
    vmf_lambda2: float = 0.1  # vmf_reg2: − λ2·êᵀe
    vmf_lambda: float = 0.2  # vmf_practice: + log(1+κ)·(λ − cos)
    margin: float = 0.5  # γ of the margin losses

    @classmethod
    def from_kwargs(cls, params: dict[str, Any]) -> "LossParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown loss parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        out = cls(**params)
        if out.vmf_approx not in APPROXIMATIONS:
            raise ValueError(f"vmf_approx={out.vmf_approx!r}: choose one of {', '.join(APPROXIMATIONS)}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def loss_params(loss_cfg: Any) -> dict[str, Any]:
    """The keyword arguments of `continuous_loss` taken from a `loss` config section (or a dict)."""
    get = loss_cfg.get if isinstance(loss_cfg, dict) else lambda k, d: getattr(loss_cfg, k, d)
    return {f.name: get(f.name, f.default) for f in fields(LossParams)}


def check_kind(kind: str) -> None:
    if kind not in LOSS_NAMES:
        raise ValueError(f"unknown continuous loss {kind!r}; choose one of {', '.join(LOSS_NAMES)}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {', '.join(REDUCTIONS)}")
