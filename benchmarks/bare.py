"""The bare PyTorch loops the framework is measured against: the same network passes on the same networks
and batch, written out by hand (docs/algorithms.md §2–7) with nothing around them: no Lightning, no logging,
no callbacks. Each loss also takes its random draws from a ``torch.Generator`` in the framework's order, so
the benchmark can check that both compute the same loss on the same inputs (like for like).
"""

from __future__ import annotations

import copy

import torch

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def rows_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def column(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *[1] * (x.ndim - 1))


def edm_fake_loss(fake, x_g, labels, g=None) -> torch.Tensor:
    """EDM's denoising loss of the fake score on generator samples: λ(σ)·‖D_ψ(x + σn) − x‖², with
    ln σ ~ N(−1.2, 1.2²)."""
    sigma = (torch.randn((x_g.shape[0],) + (1,) * (x_g.ndim - 1), generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(x_g.shape, generator=g)
    sd = fake.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (
        (weight * (fake(x_g + sigma * noise, sigma.flatten(), labels) - x_g) ** 2).flatten(1).mean(1).mean()
    )


class BareScore:
    """SIM, SiD or DI: a ψ-step then a θ-step, and the generator EMA, on copies of a method's networks."""

    def __init__(self, method):
        self.kind = type(method).__name__
        self.teacher = method.teacher
        self.generator, self.fake = copy.deepcopy(method.generator), copy.deepcopy(method.fake)
        self.ema = copy.deepcopy(method.ema)
        h = method.hparams
        self.sigma_init, self.t_max, self.batch = h.sigma_init, h.t_max, h.batch_size
        self.alpha, self.c = getattr(method, "alpha", 1.2), getattr(method, "c", 1.0)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        self.opt_f = torch.optim.Adam(self.fake.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        self.shape, self.probs = method.sample_shape, method.num_classes

    def generate(self, z, labels):
        sigma = torch.full((z.shape[0],), self.sigma_init)
        return self.generator(self.sigma_init * z, sigma, labels)

    def sigma(self, n: int, g=None) -> torch.Tensor:
        """p_sim (t = u·t_max on the ρ = 7 Karras map) for SIM and SiD, EDM's log-normal for DI."""
        if self.kind == "DiffInstruct":
            return (torch.randn((n,), generator=g) * 1.2 - 1.2).exp()
        t = torch.rand((n,), generator=g) * self.t_max
        a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
        return (a + (1 - t) * (b - a)) ** RHO

    def generator_loss(self, x_g, labels, g=None) -> torch.Tensor:
        sigma = self.sigma(x_g.shape[0], g)
        x_t = x_g + column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
        if self.kind == "DiffInstruct":  # Σ (D_ψ − D_φ) ⊙ x_g, both scores under no_grad
            with torch.no_grad():
                gap = self.fake(x_t, sigma, labels) - self.teacher(x_t, sigma, labels)
            return rows_sum(gap * x_g).mean()
        d_phi, d_psi = self.teacher(x_t, sigma, labels), self.fake(x_t, sigma, labels)
        w = (x_g - d_phi).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
        if self.kind == "SiD":  # Σ (f_φ − f_ψ) ⊙ [(f_φ − x_g) − α(f_φ − f_ψ)] / w
            gap = d_phi - d_psi
            return (rows_sum(gap * ((d_phi - x_g) - self.alpha * gap)) / w).mean()
        s2 = column(sigma, x_g) ** 2  # SIM, pseudo-Huber: −σ⁴/(2w) · (y/sqrt(‖y‖² + c²))ᵀ u
        y, u = (d_psi - d_phi) / s2, (d_psi - x_g) / s2
        d_prime = y / column((rows_sum(y**2) + self.c**2).sqrt(), y)
        return (-(sigma**4) / (2 * w) * rows_sum(d_prime * u)).mean()

    def step(self, labels) -> None:
        with torch.no_grad():
            x_g = self.generate(torch.randn(self.batch, *self.shape), labels)
        self.opt_f.zero_grad(set_to_none=True)
        edm_fake_loss(self.fake, x_g, labels).backward()
        self.opt_f.step()
        self.fake.requires_grad_(False)
        x_g = self.generate(torch.randn(self.batch, *self.shape), labels)
        self.opt_g.zero_grad(set_to_none=True)
        self.generator_loss(x_g, labels).backward()
        self.opt_g.step()
        self.fake.requires_grad_(True)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.generator.parameters(), strict=True):
                e.lerp_(p, 1 - 0.999)


class BareProgressive:
    """One progressive-distillation step: two teacher DDIM steps (no grad), one student pass and update."""

    def __init__(self, method):
        self.teacher, self.student = method.teacher, copy.deepcopy(method.student)
        self.steps = method.steps
        self.student_grid, self.teacher_grid = (g.cpu() for g in method.grids(method.steps))
        h = method.hparams
        self.opt = torch.optim.Adam(
            self.student.parameters(), lr=method.lrs[0], betas=tuple(h.betas), eps=h.eps
        )
        self.grad_clip = h.grad_clip

    def loss(self, x0, labels, g=None) -> torch.Tensor:
        i = torch.randint(self.steps, (x0.shape[0],), generator=g)
        s, s_mid, s_next = self.student_grid[i], self.teacher_grid[2 * i + 1], self.student_grid[i + 1]
        x = x0 + column(s, x0).float() * torch.randn(x0.shape, generator=g)
        with torch.no_grad():  # x' = D + (σ'/σ)(x − D), twice, in float64
            xd = x.double()
            d = self.teacher(xd, s, labels).double()
            x_mid = d + column(s_mid / s, xd) * (xd - d)
            d = self.teacher(x_mid, s_mid, labels).double()
            x_next = d + column(s_next / s_mid, xd) * (x_mid - d)
        ratio = column(s_next / s, xd)
        target = ((x_next - ratio * xd) / (1 - ratio)).float()
        weight = (s.double() ** -2).clamp(min=1.0).float()  # max(1, SNR)
        return (weight * ((self.student(x, s.float(), labels) - target) ** 2).flatten(1).mean(1)).mean()

    def step(self, x0, labels) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(x0, labels).backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.opt.step()


class BareDirect:
    """One direct-distillation stage-one step: the preconditioned NAFNet's L1 to the trajectory's end
    (x̂ = c_skip·x_k + c_out·S(c_in·x_k, ln σ/4, y)), and its update."""

    def __init__(self, method):
        self.net = copy.deepcopy(method.net)
        self.sd = method.teacher.sigma_data
        h = method.hparams
        self.opt = torch.optim.Adam(self.net.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps)

    def loss(self, x_k, sigma, x_final, labels) -> torch.Tensor:
        s, sd = column(sigma.float(), x_k), self.sd
        norm = (s**2 + sd**2).sqrt()
        c_skip, c_out, c_in = sd**2 / norm**2, s * sd / norm, 1 / norm
        x_hat = c_skip * x_k + c_out * self.net(c_in * x_k, sigma.float().log() / 4, labels)
        return (x_hat - x_final).abs().flatten(1).mean(1).mean()

    def step(self, x_k, sigma, x_final, labels) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(x_k, sigma, x_final, labels).backward()
        self.opt.step()
