"""Momentum (EMA) teachers, shared by byol.py (the target network) and dino.py (the teacher).

The teacher starts as a copy of the student and receives no gradient; after every optimizer step
it moves towards the student, teacher <- m * teacher + (1 - m) * student, with m rising from its
base value to 1 on a cosine schedule.
"""
import torch

from common.optim import cosine_schedule


def momentum_schedule(base, epochs, steps_per_epoch):
    """Per-iteration momentum m_k = 1 - (1 - base) * (cos(pi k / K) + 1) / 2 over K steps:
    BYOL's tau schedule and DINO's teacher-momentum schedule (both without warm-up)."""
    return cosine_schedule(base, 1.0, epochs, steps_per_epoch)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, over parameters only.

    Buffers (BatchNorm running statistics) stay the teacher's own, accumulated by its own forward
    passes in training mode, as in BYOL's and DINO's code. Both modules must have the same
    parameters in the same order (pass unwrapped modules, not DDP wrappers)."""
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())
    if [p.shape for p in teacher_params] != [p.shape for p in student_params]:
        raise ValueError("teacher and student parameters differ in number or shape")
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - float(momentum))
