"""Diff-Instruct (Luo et al., NeurIPS 2023, Eq. (3.3); ``di_loss.py``): integral-KL gradient.

The score difference is a constant: teacher D_φ and fake D_ψ run under no_grad (docs/algorithms.md §5):

    σ ~ p_EDM,  x_t = x_g + σ·n,   L_θ = Σ_pixels (D_ψ(x_t) − D_φ(x_t)) ⊙ x_g

so ∇_{x_g} L = D_ψ − D_φ = σ²(s_ψ − s_φ): the effective score-space weight is w(σ) = σ².
"""

from __future__ import annotations

import torch

from distillbench.methods.score import ScoreDistillation, per_sample_sum


class DiffInstruct(ScoreDistillation):
    time_law = "p_edm"
    scores_in_graph = False

    def generator_loss(self, x_g, labels):
        with torch.no_grad():
            _, d_phi, d_psi = self.teacher_and_fake(x_g, labels)
        return per_sample_sum((d_psi - d_phi) * x_g)
