"""SiD: Score identity Distillation (Zhou et al., ICML 2024, Eq. (8)–(10); ``sid_loss.py``).

Generator step (docs/algorithms.md §3.2), with f_φ the teacher and f_ψ the fake denoiser, both with frozen
parameters and gradients flowing through their input x_t = x_g + σ·n:

    σ ~ p_SIM  (t ~ U[0, t_max/1000], ρ = 7 Karras map)
    w = sg(mean |x_g − f_φ(x_t)|), clipped at ≥ 1e-5
    L_θ = Σ_pixels (f_φ − f_ψ) ⊙ [(f_φ − x_g) − α·(f_φ − f_ψ)] / w

α = 1.2 is SiD's default (1.0 for AFHQ); with α = 1 this is SIM with d = ‖·‖² and weight σ⁴/(2w).
"""

from __future__ import annotations

from distillbench.methods.score import ScoreDistillation, mean_abs, per_sample_sum
from distillbench.rules import number


def sid_weight(x_g, d_teacher):
    """w = sg(mean|x_g − f_φ|) ≥ 1e-5, per sample."""
    return mean_abs(x_g - d_teacher).detach().clamp_min(1e-5)


class SiD(ScoreDistillation):
    time_law = "p_sim"
    settings = {"alpha": number(ge=0, le=2)}

    def __init__(self, *args, alpha: float = 1.2, **kwargs):
        self.check_arguments(locals())
        super().__init__(*args, **kwargs)
        self.alpha = float(alpha)

    def generator_loss(self, x_g, labels):
        _, f_phi, f_psi = self.teacher_and_fake(x_g, labels)
        gap = f_phi - f_psi
        loss = per_sample_sum(gap * ((f_phi - x_g) - self.alpha * gap))
        return loss / sid_weight(x_g, f_phi)
