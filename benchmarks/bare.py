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


def consistency_f(net, x, sigma, labels, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """f(x, σ) = c_skip·x + c_out·F with σ_min in c_skip and c_out (docs/algorithms.md §11), through D:
    F = (D − c_skip^EDM·x)/c_out^EDM."""
    s, sd = column(sigma, x), net.sigma_data
    c_skip = sd**2 / ((s - sigma_min) ** 2 + sd**2)
    c_out = (s - sigma_min) * sd / (s**2 + sd**2).sqrt()
    c_out_edm = s * sd / (s**2 + sd**2).sqrt()
    return c_skip * x + c_out / c_out_edm * (net(x, sigma, labels) - sd**2 / (s**2 + sd**2) * x)


class BareCD:
    """One consistency-distillation step: a teacher Heun step between adjacent ρ = 7 levels (no grad), the
    online and target consistency functions under one dropout state, pseudo-Huber, Adam, the target and
    evaluation EMAs."""

    def __init__(self, method):
        self.teacher, self.student = method.teacher, copy.deepcopy(method.student)
        self.target, self.ema = copy.deepcopy(method.target), copy.deepcopy(method.ema)
        h = method.hparams
        n = h.levels
        i = torch.arange(n, dtype=torch.float64) / (n - 1)
        self.grid = (SIGMA_MAX ** (1 / RHO) + i * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
        self.mu, self.c = h.target_decay, method.c
        self.opt = torch.optim.Adam(self.student.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps)

    def loss(self, x0, labels, g=None) -> torch.Tensor:
        i = torch.randint(len(self.grid) - 1, (x0.shape[0],), generator=g)
        t, t2 = self.grid[i], self.grid[i + 1]
        x_t = x0 + column(t, x0).float() * torch.randn(x0.shape, generator=g)
        with torch.no_grad():  # Heun from t to t₂ on dx/dσ = (x − D)/σ, in float64
            x = x_t.double()
            d1 = (x - self.teacher(x, t, labels).double()) / column(t, x)
            x_e = x + column(t2 - t, x) * d1
            d2 = (x_e - self.teacher(x_e, t2, labels).double()) / column(t2, x)
            x_hat = (x + column(t2 - t, x) * (d1 + d2) / 2).float()
        state = torch.get_rng_state()
        online = consistency_f(self.student, x_t, t.float(), labels)
        torch.set_rng_state(state)
        with torch.no_grad():
            target = consistency_f(self.target, x_hat, t2.float(), labels)
        return ((rows_sum((online - target) ** 2) + self.c**2).sqrt() - self.c).mean()

    def step(self, x0, labels) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(x0, labels).backward()
        self.opt.step()
        with torch.no_grad():
            for net, rate in ((self.target, self.mu), (self.ema, 0.999)):
                for e, p in zip(net.parameters(), self.student.parameters(), strict=True):
                    e.lerp_(p, 1 - rate)


class BareECT:
    """One ECT step: t log-normal, r from the stage's mapping, D at t (grad) and at r (no grad) on one noise
    and one dropout state, (√(‖D_t − D_r‖² + c²) − c)/(t − r), Adam, the evaluation EMA."""

    def __init__(self, method):
        self.student, self.ema = copy.deepcopy(method.student), copy.deepcopy(method.ema)
        self.method = method  # its stage and settings
        h = method.hparams
        self.opt = torch.optim.Adam(self.student.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps)

    def loss(self, y, labels, g=None) -> torch.Tensor:
        m = self.method
        t = (m.p_mean + m.p_std * torch.randn((y.shape[0],), generator=g)).exp()
        decay = m.q ** -(m.stage + 1)
        r = (t * (1 - decay * (1 + m.k * torch.sigmoid(-m.b * t)))).clamp(min=0)
        eps = torch.randn(y.shape, generator=g)
        state = torch.get_rng_state()
        d_t = self.student(y + column(t, y) * eps, t, labels)
        torch.set_rng_state(state)
        with torch.no_grad():
            d_r = self.student(y + column(r, y) * eps, r.clamp(min=SIGMA_MIN), labels)
            d_r = torch.where(column(r > 0, y), d_r, y)
        return (((rows_sum((d_t - d_r) ** 2) + m.c**2).sqrt() - m.c) / (t - r)).mean()

    def step(self, y, labels) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(y, labels).backward()
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.student.parameters(), strict=True):
                e.lerp_(p, 1 - 0.999)


def grid_sigmas(levels: int = 1000) -> torch.Tensor:
    """The ρ = 7 grid of ``levels`` σ from 0.002 up to 80 (small → large), as DMD2 indexes it."""
    t = torch.linspace(0, 1, levels, dtype=torch.float64)
    return ((SIGMA_MIN ** (1 / RHO) + t * (SIGMA_MAX ** (1 / RHO) - SIGMA_MIN ** (1 / RHO))) ** RHO).float()


def with_features(fake, x, sigma, labels):
    """The fake network's output and its UNet's mid-block output (the digits networks' bottleneck)."""
    seen = []
    handle = fake.net.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    out = fake(x, sigma, labels)
    handle.remove()
    return out, seen[-1]


class BareDMD2:
    """DMD2 with its GAN (docs/algorithms.md §10): k ψ-steps (EDM-weighted fake loss on the grid, the head's
    softplus losses on real and generated images), one θ-step (½·mean(x_g − sg(x_g − g))² and the head's
    generator term), AdamW with a gradient-norm clip, and the generator EMA."""

    def __init__(self, method):
        self.teacher = method.teacher
        self.generator, self.fake = copy.deepcopy(method.generator), copy.deepcopy(method.fake)
        self.head, self.ema = copy.deepcopy(method.head), copy.deepcopy(method.ema)
        h = method.hparams
        self.sigma_init, self.batch, self.k, self.clip = h.sigma_init, h.batch_size, h.fake_updates, 10.0
        self.sigmas, self.shape = grid_sigmas(), method.sample_shape
        adamw = lambda params: torch.optim.AdamW(params, lr=h.lr, betas=tuple(h.betas), eps=h.eps,  # noqa: E731
                                                 weight_decay=0.01)  # fmt: skip
        self.opt_g = adamw(self.generator.parameters())
        self.opt_f = adamw([*self.fake.parameters(), *self.head.parameters()])

    def generate(self, z, labels):
        return self.generator(self.sigma_init * z, torch.full((z.shape[0],), self.sigma_init), labels)

    def logit(self, x, labels, g=None):  # the diffusion GAN over all 1000 levels
        sigma = self.sigmas[torch.randint(0, 1000, (x.shape[0],), generator=g)]
        x = x + column(sigma, x) * torch.randn(x.shape, generator=g)
        _, features = with_features(self.fake, x, sigma, labels)
        return self.head(features).flatten()

    def generator_loss(self, x_g, labels, g=None) -> torch.Tensor:
        with torch.no_grad():
            sigma = self.sigmas[torch.randint(20, 981, (x_g.shape[0],), generator=g)]
            x_t = x_g + column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
            p_real, p_fake = x_g - self.teacher(x_t, sigma, labels), x_g - self.fake(x_t, sigma, labels)
            grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().flatten(1).mean(1).reshape(-1, 1, 1, 1))
        dm = 0.5 * ((x_g - (x_g - grad).detach()) ** 2).flatten(1).mean(1)
        return (dm + 3e-3 * torch.nn.functional.softplus(-self.logit(x_g, labels, g))).mean()

    def fake_loss(self, x_real, labels, g=None) -> torch.Tensor:
        with torch.no_grad():
            x_g = self.generate(torch.randn(x_real.shape, generator=g), labels)
        sigma = self.sigmas[torch.randint(0, 1000, (x_g.shape[0],), generator=g)]
        x_t = x_g + column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
        weight = column(sigma**-2 + self.fake.sigma_data**-2, x_g)
        edm = (weight * (self.fake(x_t, sigma, labels) - x_g) ** 2).flatten(1).mean(1)
        real, fake = self.logit(x_real, labels, g), self.logit(x_g, labels, g)
        softplus = torch.nn.functional.softplus
        return (edm + 1e-2 * (softplus(fake) + softplus(-real))).mean()

    def step(self, x_real, labels) -> None:
        for _ in range(self.k):
            self.opt_f.zero_grad(set_to_none=True)
            self.fake_loss(x_real, labels).backward()
            torch.nn.utils.clip_grad_norm_([*self.fake.parameters(), *self.head.parameters()], self.clip)
            self.opt_f.step()
        for net in (self.fake, self.head):
            net.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        self.generator_loss(self.generate(torch.randn(self.batch, *self.shape), labels), labels).backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.clip)
        self.opt_g.step()
        for net in (self.fake, self.head):
            net.requires_grad_(True)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.generator.parameters(), strict=True):
                e.lerp_(p, 1 - 0.999)


class BareSiDA(BareScore):
    """SiDA (docs/algorithms.md §11): a ψ-step with EDM's loss summed over pixels and the encoder logit's BCE
    on real and generated images at the same σ and noise, ψ's gradients clipped at ±1, then SiD's θ-step with
    ½·L_SiD + ½·λ_G·pixels·BCE(clamp ℓ, 1)/w."""

    def __init__(self, method):
        super().__init__(method)
        self.kind, self.alpha, self.weight_g = "SiD", method.alpha, method.gan_weight_g

    def generator_loss(self, x_g, labels, g=None) -> torch.Tensor:
        sigma = self.sigma(x_g.shape[0], g)
        x_t = x_g + column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
        d_phi = self.teacher(x_t, sigma, labels)
        d_psi, features = with_features(self.fake, x_t, sigma, labels)
        w = (x_g - d_phi).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
        gap = d_phi - d_psi
        sid = rows_sum(gap * ((d_phi - x_g) - self.alpha * gap)) / w
        logit = features.mean(1, keepdim=True).clamp(-10, 10)
        gan = x_g[0].numel() * torch.nn.functional.softplus(-logit).flatten(1).mean(1) / w
        return (0.5 * sid + 0.5 * self.weight_g * gan).mean()

    def fake_loss(self, x_real, labels, g=None) -> torch.Tensor:
        with torch.no_grad():
            x_g = self.generate(torch.randn(x_real.shape, generator=g), labels)
        sigma = (torch.randn((x_g.shape[0],), generator=g) * 1.2 - 1.2).exp()
        noise = column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
        sd = self.fake.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        d, features_g = with_features(self.fake, x_g + noise, sigma, labels)
        _, features_r = with_features(self.fake, x_real + noise, sigma, labels)
        softplus = torch.nn.functional.softplus
        bce = softplus(-features_r.mean(1)).flatten(1).mean(1) + softplus(features_g.mean(1)).flatten(1).mean(
            1
        )
        return (weight * rows_sum((d - x_g) ** 2) + weight * bce / 2).mean()

    def step(self, x_real, labels) -> None:
        self.opt_f.zero_grad(set_to_none=True)
        self.fake_loss(x_real, labels).backward()
        torch.nn.utils.clip_grad_value_(self.fake.parameters(), 1.0)
        self.opt_f.step()
        self.fake.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        self.generator_loss(self.generate(torch.randn(self.batch, *self.shape), labels), labels).backward()
        self.opt_g.step()
        self.fake.requires_grad_(True)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.generator.parameters(), strict=True):
                e.lerp_(p, 1 - 0.999)
