"""Pure KD loss functions: plain KD (Hinton), DFND's noisy distillation, PU's robust KD.

Everything here is a function of tensors: no state, no registry, no optimizer. The
objectives in this package wrap them into modules with learnable parts and options.
Shapes: logits are N×K, class vectors K, weight-vector sets V×K, targets N (long).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_PROB_FLOOR = 1e-8  # clamp before log in noisy_nll: log(0) would give -inf and NaN gradients


def kd_per_sample(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Per-sample Hinton KD: T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)), a vector of N values."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    # Σ_k p_T,k (log p_T,k − log p_S,k); a zero p_T,k contributes 0 (its exp is exactly 0).
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * (T * T)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float,
            weights: Tensor | None = None) -> Tensor:
    """Hinton et al. 2015: mean_i T²·KL(softmax(z_T,i/T) ‖ softmax(z_S,i/T)); weighted: Σ_i w_i·kl_i / N.

    With per-sample ``weights`` (shape N) the sum is divided by N, not by Σw: the weights then
    scale the loss (as PU's robust KD intends: a heavier weight vector is a larger loss) instead
    of only re-mixing the batch.
    """
    kl = kd_per_sample(student_logits, teacher_logits, T)
    if weights is None:
        return kl.mean()
    return (weights.to(kl) * kl).sum() / kl.numel()


def noise_adaptation_matrix(diag: Tensor, theta: Tensor) -> Tensor:
    """DFND eq. (noise adaptation): Q_ii = a_i, Q_ij = (1−a_i)·softmax_{j≠i}(θ_i)_j; rows sum to 1.

    ``diag`` holds the k per-class accuracies a_i (a 0-d tensor is broadcast to all classes);
    ``theta`` is k×k (its diagonal is ignored). θ = 0 gives off-diagonals (1−a_i)/(k−1).
    The result lives on θ's device and dtype, and is differentiable in θ and in ``diag``.
    """
    k = theta.shape[0]
    if theta.shape != (k, k) or k < 2:
        raise ValueError(f"theta must be k×k with k >= 2, got shape {tuple(theta.shape)}")
    a = diag.to(theta).expand(k)
    eye = torch.eye(k, dtype=torch.bool, device=theta.device)
    off = torch.softmax(theta.masked_fill(eye, float("-inf")), dim=1)  # row i: 0 at j = i
    return off * (1.0 - a).unsqueeze(1) + torch.diag(a)


def noisy_nll(student_logits: Tensor, Q: Tensor, target: Tensor) -> Tensor:
    """DFND noisy loss: mean_i −log(softmax(z_S,i) · Q)[ŷ_i], with ŷ the teacher's argmax."""
    p = torch.softmax(student_logits, dim=1) @ Q.to(student_logits)
    return F.nll_loss(p.clamp_min(_PROB_FLOOR).log(), target)


def robust_class_weights(class_counts: Tensor, eps: float = 1e-6) -> Tensor:
    """PU Compression: w_k = K·(1/y_k) / Σ_j (1/y_j) from the teacher's soft class counts y (Σ_k w_k = K).

    A count of 0 would make 1/y_k infinite; counts are clamped to ``eps`` first, so such a
    class gets (nearly) all of the weight K and the others (nearly) none. Soft counts (sums of
    teacher probabilities) are positive in practice; a zero means no data or hard counts.
    """
    y = torch.as_tensor(class_counts, dtype=torch.float32)
    if y.ndim != 1 or not torch.isfinite(y).all() or (y < 0).any():
        raise ValueError(f"class_counts must be a vector of finite counts >= 0, got {y.tolist()}")
    inv = 1.0 / y.clamp_min(eps)
    return y.numel() * inv / inv.sum()


def perturbed_weights(w: Tensor, eps: float, M: int, mode: str = "box",
                      generator: torch.Generator | None = None) -> Tensor:
    """PU robust KD's candidate set: an (M+1)×K tensor, row 0 = w, rows 1..M = perturbed w.

    ``mode="reference"``: the official PU script's one-sided w + eps·U[0,1) (every weight grows).
    ``mode="box"``: signed w + eps·U[-1,1), clipped to stay positive, renormalised to Σw
    (= K for ``robust_class_weights``), so a perturbation moves weight between classes.
    Noise is drawn on the generator's device (CPU when none is given) and moved to w's.
    Each call is a new draw: how often to draw is the caller's choice (``RobustKD`` draws the
    reference set once per run, as the official script does, and a box set every batch).
    """
    if mode not in ("box", "reference"):
        raise ValueError(f"mode must be 'box' or 'reference', got {mode!r}")
    K = w.numel()
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(M, K, generator=generator, device=device, dtype=torch.float32).to(w)
    if mode == "reference":
        rows = w + eps * u
    else:
        rows = (w + eps * (2.0 * u - 1.0)).clamp_min(1e-6)
        rows = rows * (w.sum() / rows.sum(dim=1, keepdim=True))
    return torch.cat([w.unsqueeze(0), rows], dim=0)


def worst_case_kd(student_logits: Tensor, teacher_logits: Tensor, T: float,
                  weight_vectors: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """PU robust KD: max_v Σ_i W[v, ŷ_i]·kl_i / N over the candidate weight vectors; returns (loss, v).

    kl_i is ``kd_per_sample``; ties go to the lowest index (row 0 = unperturbed w).
    """
    kl = kd_per_sample(student_logits, teacher_logits, T)
    losses = (weight_vectors.to(kl)[:, target] * kl).sum(dim=1) / kl.numel()  # one per vector
    idx = torch.argmax(losses.detach())
    return losses[idx], idx
