"""Exponential-moving-average teacher update (VocAlign Sec. 3.2, after Mean Teacher / MIC).

Paper: ``phi_{t+1} <- alpha * phi_t + (1 - alpha) * theta_t`` with ``alpha = 0.99``.
Released code (``mmseg/models/segmentors/teacher_module.py``, ``EMATeacher._update_ema``,
l.70-81) warms alpha up as ``alpha_t = min(1 - 1/(iter + 1), alpha)``; at ``iter == 0`` it
copies the student into the teacher (``_init_ema_weights``, l.59-68, called from
``update_weights`` l.187-194). Since ``ema_alpha(0, alpha) == 0``, calling
:func:`update_ema_` at step 0 performs exactly that copy, so one code path covers both.
"""

from __future__ import annotations

from typing import Iterable, List

import torch
from torch import Tensor

__all__ = ["ema_alpha", "update_ema_"]


def ema_alpha(step: int, alpha: float) -> float:
    """Warm-up EMA coefficient ``min(1 - 1/(step + 1), alpha)``.

    Step 0 -> 0 (teacher := student), step 1 -> 0.5, step 2 -> 2/3, ... capped at ``alpha``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return min(1.0 - 1.0 / (step + 1), float(alpha))


@torch.no_grad()
def update_ema_(
    teacher_params: Iterable[Tensor],
    student_params: Iterable[Tensor],
    alpha: float,
) -> None:
    """In place: ``teacher = alpha * teacher + (1 - alpha) * student`` for each pair.

    Args:
        teacher_params: teacher tensors (e.g. its trainable LoRA parameters), updated in place.
        student_params: student tensors in the same order, same shapes and dtypes.
        alpha: EMA coefficient in ``[0, 1]`` (typically :func:`ema_alpha`).

    Uses ``torch._foreach_mul_`` / ``torch._foreach_add_`` (one fused kernel per
    device/dtype group) under ``no_grad``; ``alpha == 0`` is a plain copy. Each teacher tensor's version
    counter is bumped, as by any in-place update.
    """
    # `detach`, not `.data`: the in-place update bumps the weights' version counters (which the text cache reads).
    teacher: List[Tensor] = [t.detach() for t in teacher_params]
    student: List[Tensor] = [s.detach() for s in student_params]
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch at index {i}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        if t.numel() > 0 and t.data_ptr() == s.data_ptr():
            raise ValueError(f"teacher and student share storage at index {i}; did you forget to deepcopy?")
    if not teacher:
        return
    if alpha == 0.0:
        torch._foreach_copy_(teacher, student)
        return
    torch._foreach_mul_(teacher, alpha)
    torch._foreach_add_(teacher, student, alpha=1.0 - alpha)
