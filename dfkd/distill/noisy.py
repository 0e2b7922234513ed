"""DFND noisy distillation (Chen et al., CVPR 2021): KD + λ·NLL(softmax(z_S)·Q, argmax teacher).

Q is the noise-adaptation matrix: diagonal = the teacher's accuracy (per class when the card
has ``class_accuracy``, else the scalar ``accuracy`` for every class), off-diagonal mass
(1−a_i)·softmax(θ_i). θ (k×k, starting at 0) is this module's parameter; it is trained by its
own optimizer, declared by ``extra_param_groups()`` (default Adam, lr 1e-3 as in the
reference), which the training loop builds and steps with the student's. With ``learn_diagonal=true``
the diagonal is learned too (a sigmoid of a parameter starting at a), in θ's group.

A card without accuracy is an error unless ``estimate_accuracy=true``: then a is estimated by the
teacher's mean confidence, max_k softmax(z_T)_k, on the training images (per predicted class, or
in all with ``per_class_accuracy=false``): its accuracy there if it is calibrated (Guo et al.,
"On Calibration of Modern Neural Networks", ICML 2017, Sec. 2, which also shows modern networks
overconfident, so an upper estimate). It is printed and recorded by ``describe()``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import DfkdError
from ..train.optim import OPTIMIZERS
from .losses import kd_loss, noise_adaptation_matrix, noisy_nll
from .objectives import Objective, register, require


def _check_accuracy(values: list[float], where: str) -> None:
    for a in values:
        if not 0.0 <= a <= 1.0:
            hint = " (it looks like a percentage; give a fraction)" if 1 < a <= 100 else ""
            raise DfkdError(f"{where}: accuracy {a!r} is not in [0, 1]{hint}")


def teacher_diagonal(num_classes: int, flag: float | None, info: dict, per_class: bool = True,
                     estimate: bool = False) -> tuple[Tensor | None, str]:
    """Q's diagonal and where it came from: the flag, else card class_accuracy, else card accuracy,
    else (``estimate``) the teacher's confidence on the training images, ``info["confidence"]``
    (None before they are seen).

    ``per_class=False`` skips class_accuracy (the reference uses one scalar a for every class).
    """
    if flag is not None:
        _check_accuracy([flag], "--set objective.accuracy")
        return torch.full((num_classes,), float(flag)), "--set objective.accuracy"
    card_class = info.get("class_accuracy") if per_class else None
    if card_class is not None:
        card_class = [float(a) for a in card_class]
        if len(card_class) != num_classes:
            raise DfkdError(f"teacher card class_accuracy has {len(card_class)} entries but the "
                            f"teacher has {num_classes} classes")
        _check_accuracy(card_class, "teacher card class_accuracy")
        return torch.tensor(card_class), "card class_accuracy"
    if info.get("accuracy") is not None:
        _check_accuracy([float(info["accuracy"])], "teacher card accuracy")
        return torch.full((num_classes,), float(info["accuracy"])), "card accuracy"
    if estimate:
        conf = info.get("confidence")
        if conf is None:
            return None, "the teacher's confidence"
        a = torch.tensor(conf["class_mean"] if per_class else [conf["mean"]] * num_classes, dtype=torch.float32)
        return a, f"the teacher's mean confidence on the training images (an estimate: {conf['mean']:.4f})"
    card = info.get("teacher_card") or "TEACHER.yaml"
    raise DfkdError(f"objective 'noisy' needs the teacher's accuracy for its noise-adaptation matrix, and"
                    f" {card} has neither class_accuracy nor accuracy: measure it on labeled images with"
                    f" `dfkd eval --model {card} --data LABELED_IMAGES --write-card`, or pass"
                    " --set objective.accuracy=0.9 (a fraction in [0, 1]), or --set objective.estimate_accuracy=true"
                    " (the teacher's mean confidence on the training images)")


@register("noisy", paper="Chen et al. Learning Student Networks in the Wild. CVPR 2021 (DFND)")
class NoisyKD(Objective):
    """DFND noisy distillation: KD + λ·NLL(softmax(z_S)·Q, argmax z_T), Q with learnable θ."""

    OPTIONS = {"temperature": (float, 4.0), "lambda": (float, 1.0), "accuracy": (float, None),
               "per_class_accuracy": (bool, True), "learn_diagonal": (bool, False), "theta_lr": (float, 1e-3),
               "theta_optimizer": (str, "adam"), "estimate_accuracy": (bool, False)}

    @classmethod
    def check(cls, opts: dict, num_classes: int, info: dict) -> None:
        require(opts["temperature"] > 0, "temperature", opts["temperature"], "> 0")
        require(opts["lambda"] >= 0, "lambda", opts["lambda"], ">= 0")
        require(opts["theta_lr"] > 0, "theta_lr", opts["theta_lr"], "> 0")
        require(opts["theta_optimizer"] in OPTIMIZERS, "theta_optimizer", opts["theta_optimizer"],
                "one of " + ", ".join(OPTIMIZERS))
        teacher_diagonal(num_classes, opts["accuracy"], info, opts["per_class_accuracy"],
                         opts["estimate_accuracy"])  # Q's diagonal is known, or will be

    def __init__(self, num_classes: int, cfg: dict | None = None, info: dict | None = None):
        super().__init__(num_classes, cfg, info)
        o = self.opts
        a, self.source = teacher_diagonal(self.num_classes, o["accuracy"], info or {},
                                          o["per_class_accuracy"], o["estimate_accuracy"])
        if a is None:
            raise ValueError("estimate_accuracy needs info['confidence'], the teacher's on the training images")
        self.theta = nn.Parameter(torch.zeros(self.num_classes, self.num_classes))
        if o["learn_diagonal"]:
            self.diag_logit = nn.Parameter(torch.logit(a.clamp(1e-4, 1 - 1e-4)))
        else:
            self.register_buffer("diag", a)

    def diagonal(self) -> Tensor:
        return torch.sigmoid(self.diag_logit) if self.opts["learn_diagonal"] else self.diag

    def noise_adaptation(self) -> Tensor:
        """The current Q (k×k, row-stochastic)."""
        return noise_adaptation_matrix(self.diagonal(), self.theta)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        s, t = student_logits.float(), teacher_logits.detach().float()
        kd = kd_loss(s, t, self.opts["temperature"])
        nll = noisy_nll(s, self.noise_adaptation(), t.argmax(dim=1))
        return {"loss": kd + self.opts["lambda"] * nll, "kd": kd, "noisy_nll": nll}

    def extra_param_groups(self) -> list[dict]:
        return [{"name": "noise_adaptation", "params": list(self.parameters()),
                 "lr": self.opts["theta_lr"], "optimizer": self.opts["theta_optimizer"]}]

    def describe(self) -> str:
        learned = "learned" if self.opts["learn_diagonal"] else "fixed"
        return (f"noisy: KD T={self.opts['temperature']:g} + {self.opts['lambda']:g}·noisy NLL; "
                f"noise adaptation diagonal ({learned}) from {self.source} "
                f"({self.num_classes} classes); θ trained by "
                f"{self.opts['theta_optimizer']} lr {self.opts['theta_lr']:g}")
