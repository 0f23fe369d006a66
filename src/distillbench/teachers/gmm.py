"""The exact EDM denoiser of a class-conditional low-rank Gaussian mixture (``teacher=gmm_digits|gmm_mnist``).

Component k has weight π_k, class c(k), mean μ_k and covariance Σ_k = U_k diag(λ_k) U_kᵀ + s_k² I with U_k
orthonormal (d × r). With v_k = s_k² + σ² and the projection P_k = U_kᵀ(x − μ_k) (docs/gmm.md):

    (Σ_k + σ²I)⁻¹ = (I − U_k diag(λ_k / (λ_k + v_k)) U_kᵀ) / v_k                       (Woodbury)
    (x − μ_k)ᵀ(Σ_k + σ²I)⁻¹(x − μ_k) = (‖x − μ_k‖² − ‖P_k‖²) / v_k + Σ_i P_ki² / (λ_ki + v_k)
    log det(Σ_k + σ²I) = (d − r) log v_k + Σ_i log(λ_ki + v_k)
    w_k(x) ∝ π_k N(x; μ_k, Σ_k + σ²I)        (only the label's components when a label ≥ 0 is given)
    D(x; σ) = Σ_k w_k [x − σ²/v_k (x − μ_k) + U_k (σ² λ_k / (v_k (λ_k + v_k)) ⊙ P_k)]

which is Σ_k w_k [μ_k + Σ_k(Σ_k + σ²I)⁻¹(x − μ_k)] in O(K·d·r) per sample, without a d × d matrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distillbench.errors import ConfigError
from distillbench.teachers.denoiser import Denoiser
from distillbench.utils.io import atomic_write_text, atomic_writer

TENSORS = "mixture.safetensors"
SPEC = "mixture.json"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
CHUNK = 4096  # rows per pass, so that the (N, K, r) projections stay small


def orthonormal(bases: torch.Tensor) -> torch.Tensor:
    """The Q of each basis' QR with a positive-diagonal R: the bases made exactly orthonormal in their dtype
    (stored values are rounded), and unchanged up to that rounding."""
    q, r = torch.linalg.qr(bases)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


class LowRankGMM(nn.Module):
    """A mixture of K Gaussians N(μ_k, U_k diag(λ_k) U_kᵀ + s_k² I) over flattened ``sample_shape`` samples.

    It has buffers and no parameters: ``.to(device)`` moves it, its ``state_dict`` is empty.
    """

    def __init__(self, means, bases, eigenvalues, noise_variance, weights, classes, sample_shape,
                 num_classes: int = 0, dtype: torch.dtype = torch.float64):  # fmt: skip
        super().__init__()
        as_float = lambda t: torch.as_tensor(t).to(dtype)  # noqa: E731
        means, bases, lam, s2, w = map(as_float, (means, bases, eigenvalues, noise_variance, weights))
        k, d = means.shape
        if (
            bases.shape[:2] != (k, d)
            or lam.shape != (k, bases.shape[2])
            or s2.shape != (k,)
            or w.shape != (k,)
        ):
            raise ValueError(
                f"mixture shapes disagree: means {tuple(means.shape)}, bases {tuple(bases.shape)}, "
                f"eigenvalues {tuple(lam.shape)}, noise_variance {tuple(s2.shape)}, weights {tuple(w.shape)}"
            )
        if (lam < 0).any() or (s2 <= 0).any() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                "a mixture needs eigenvalues >= 0, noise variances > 0 and weights >= 0 (sum > 0)"
            )
        if math.prod(sample_shape) != d:
            raise ValueError(f"sample_shape {tuple(sample_shape)} does not hold {d} values")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = int(num_classes)
        self.dim, self.rank = d, bases.shape[2]
        bases = orthonormal(bases)
        buffers = {
            "means": means, "bases": bases, "eigenvalues": lam, "noise_variance": s2, "weights": w / w.sum(),
            "classes": torch.as_tensor(classes, dtype=torch.long),
            # the same numbers laid out for the two matmuls of :meth:`_terms` and :meth:`denoise`
            "bases_by_dim": bases.permute(1, 0, 2).reshape(d, -1).contiguous(),  # (d, K·r)
            "bases_by_row": bases.transpose(1, 2).reshape(-1, d).contiguous(),  # (K·r, d)
            "means_proj": torch.einsum("kd,kdr->kr", means, bases),  # U_kᵀ μ_k
            "means_sq": (means * means).sum(1),
        }  # fmt: skip
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    # ---- the Woodbury form -------------------------------------------------------------------------------
    def _terms(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per sample and component: v = s² + σ² (N, K), P = Uᵀ(x − μ) (N, K, r), log N(x; μ, Σ + σ²I)."""
        k, r = len(self.means), self.rank
        v = self.noise_variance + sigma[:, None] ** 2
        proj = (x @ self.bases_by_dim).view(-1, k, r) - self.means_proj
        sq = (x * x).sum(1, keepdim=True) - 2 * x @ self.means.T + self.means_sq
        outside = (sq - (proj * proj).sum(-1)).clamp_min(0)  # ‖(I − UUᵀ)(x − μ)‖²
        lam_v = self.eigenvalues + v[..., None]  # (N, K, r)
        maha = outside / v + (proj * proj / lam_v).sum(-1)
        logdet = (self.dim - r) * v.log() + lam_v.log().sum(-1)
        return v, proj, -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))

    def _allowed(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """(N, K) mask of each sample's components: its label's, or all for label −1 / no labels."""
        if labels is None or not self.num_classes:
            return None
        labels = torch.as_tensor(labels, device=self.classes.device).reshape(-1).expand(n)
        return (self.classes[None] == labels[:, None]) | (labels[:, None] < 0)

    def _log_joint(self, x, sigma, labels=None):
        v, proj, loglik = self._terms(x, sigma)
        logw = self.weights.log() + loglik
        allowed = self._allowed(labels, len(x))
        return v, proj, logw if allowed is None else logw.masked_fill(~allowed, -math.inf)

    def _rows(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d) rows in the mixture's dtype and a (N,) σ (a scalar or one per sample)."""
        x = x.reshape(len(x), -1).to(self.means)
        sigma = torch.as_tensor(sigma, dtype=self.means.dtype, device=x.device).reshape(-1)
        return x, sigma.expand(len(x))

    def _chunked(self, fn, x, sigma, labels):
        x, sigma = self._rows(x, sigma)
        labels = (
            None if labels is None else torch.as_tensor(labels, device=x.device).reshape(-1).expand(len(x))
        )
        parts = [fn(x[i : i + CHUNK], sigma[i : i + CHUNK], None if labels is None else labels[i : i + CHUNK])
                 for i in range(0, len(x), CHUNK)]  # fmt: skip
        return torch.cat(parts) if parts else torch.empty(0, dtype=x.dtype)

    # ---- what the benchmark reads --------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """E[x₀ | x_σ = x] (and the label), in the mixture's dtype, shaped as ``x``."""

        def fn(x, sigma, labels):
            v, proj, logw = self._log_joint(x, sigma, labels)
            w = torch.softmax(logw, dim=1)
            s2 = sigma[:, None] ** 2
            pull = w * s2 / v  # (N, K): weight of σ²/v_k (x − μ_k)
            coef = (w * s2 / v)[..., None] * self.eigenvalues / (self.eigenvalues + v[..., None]) * proj
            out = x - pull.sum(1, keepdim=True) * x + pull @ self.means
            return out + coef.reshape(len(x), -1) @ self.bases_by_row

        return self._chunked(fn, x, sigma, labels).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma=0.0, labels=None) -> torch.Tensor:
        """log p_σ(x) (σ = 0: the clean mixture), or log p_σ(x | label) for labels ≥ 0; shape (N,)."""

        def fn(x, sigma, labels):
            logp = self._log_joint(x, sigma, labels)[2]
            if labels is not None and self.num_classes:  # within-class weights π_k / π_c
                logp = (
                    logp - torch.where(labels < 0, 0.0, self.class_prior.log()[labels.clamp_min(0)])[:, None]
                )
            return torch.logsumexp(logp, dim=1)

        return self._chunked(fn, x, sigma, labels)

    def responsibilities(self, x: torch.Tensor, sigma=0.0, labels=None) -> torch.Tensor:
        """w_k(x) under the mixture noised to σ, (N, K)."""
        return self._chunked(lambda x, s, y: torch.softmax(self._log_joint(x, s, y)[2], 1), x, sigma, labels)

    def class_posterior(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """p(c | x) under the mixture noised to σ, (N, C): the responsibilities summed per class."""
        w = self.responsibilities(x, sigma)
        return torch.zeros(len(w), self.num_classes, dtype=w.dtype, device=w.device).index_add_(
            1, self.classes, w
        )

    @property
    def class_prior(self) -> torch.Tensor:
        """p(c) = Σ_{k: c(k) = c} π_k."""
        return torch.zeros(self.num_classes, dtype=self.weights.dtype, device=self.weights.device).index_add_(
            0, self.classes, self.weights
        )

    def covariances(self) -> torch.Tensor:
        """The dense Σ_k, (K, d, d) (for tests and moments; O(K·d²) memory)."""
        eye = torch.eye(self.dim, dtype=self.means.dtype, device=self.means.device)
        low = (self.bases * self.eigenvalues[:, None]) @ self.bases.transpose(1, 2)
        return low + self.noise_variance[:, None, None] * eye

    def mean(self) -> torch.Tensor:
        """E[x] = Σ_k π_k μ_k, flattened."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x] = Σ_k π_k (Σ_k + μ_k μ_kᵀ) − E[x] E[x]ᵀ, (d, d)."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covariances())
        second = second + (self.means.T * self.weights) @ self.means
        return second - torch.outer(m, m)

    def sample(self, n: int, rng: torch.Generator | None = None, labels=None):
        """``n`` exact samples (shaped ``sample_shape``), their labels and components, drawn on the CPU from
        ``rng``: k ~ π (within the label's components when labels are given), then
        x = μ_k + U_k (√λ_k ⊙ a) + s_k b with a, b standard normal."""
        weights = self.weights.cpu()
        allowed = self._allowed(labels, n)
        probs = weights.expand(n, -1) if allowed is None else weights * allowed.cpu()
        comp = torch.multinomial(probs, 1, generator=rng).squeeze(1) if n else self.classes.cpu()[:0]
        a = torch.randn(n, self.rank, generator=rng, dtype=torch.float64)
        b = torch.randn(n, self.dim, generator=rng, dtype=torch.float64)
        comp_, a, b = (t.to(self.means.device) for t in (comp, a, b))
        a, b = a.to(self.means.dtype), b.to(self.means.dtype)
        coef = torch.zeros(n, len(self.means), self.rank, dtype=a.dtype, device=a.device)
        coef[torch.arange(n, device=a.device), comp_] = self.eigenvalues[comp_].sqrt() * a
        low = coef.reshape(n, -1) @ self.bases_by_row  # U_k (√λ_k ⊙ a) without an (n, d, r) gather
        x = self.means[comp_] + low + self.noise_variance[comp_, None].sqrt() * b
        return x.reshape(n, *self.sample_shape), self.classes[comp_], comp_

    # ---- the file ------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, info: dict, dtype: torch.dtype = torch.float32) -> None:
        """``mixture.safetensors`` (tensors in ``dtype``) and ``mixture.json`` (shape, classes, ``info``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = ("means", "bases", "eigenvalues", "noise_variance", "weights")
        tensors = {name: getattr(self, name).detach().cpu().to(dtype).contiguous() for name in names}
        tensors["classes"] = self.classes.cpu().contiguous()
        with atomic_writer(folder / TENSORS, binary=True) as tmp:
            save_file(tensors, tmp)
        spec = {"sample_shape": list(self.sample_shape), "num_classes": self.num_classes, **info}
        atomic_write_text(folder / SPEC, json.dumps(spec, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float64) -> LowRankGMM:
        folder = Path(folder)
        if not (folder / TENSORS).is_file() or not (folder / SPEC).is_file():
            raise ConfigError(
                f"no mixture in {folder}: expected {TENSORS} and {SPEC}; fit one with "
                "`python -m distillbench.fit_gmm data=digits`"
            )
        spec = json.loads((folder / SPEC).read_text())
        t = {name: value.to(torch.float64) if value.is_floating_point() else value
             for name, value in load_file(str(folder / TENSORS)).items()}  # fmt: skip
        gmm = cls(t["means"], t["bases"], t["eigenvalues"], t["noise_variance"], t["weights"], t["classes"],
                  spec["sample_shape"], spec["num_classes"], dtype)  # fmt: skip
        gmm.info = spec
        return gmm


def load_mixture(path: str | Path, dtype: str = "float64") -> LowRankGMM:
    """A shipped or fitted mixture folder, computing in ``dtype`` (``float64`` or ``float32``)."""
    if dtype not in DTYPES:
        raise ConfigError(f"teacher.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return LowRankGMM.load(path, DTYPES[dtype])


class GMMDenoiser(Denoiser):
    """D(x; σ, labels) of a :class:`LowRankGMM`, exact; frozen, no parameters.

    Its samples are not confined to [-1, 1] (``bounded = False``): samplers return them unclipped, so the
    ground-truth metrics see what the sampler made.
    """

    bounded = False

    def __init__(self, mixture: LowRankGMM, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):  # fmt: skip
        super().__init__()
        self.mixture = mixture
        self.sample_shape = mixture.sample_shape
        self.num_classes = mixture.num_classes
        self.sigma_data, self.sigma_min, self.sigma_max = (
            float(sigma_data),
            float(sigma_min),
            float(sigma_max),
        )
        self.info = dict(getattr(mixture, "info", {}))

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        labels = labels if self.num_classes else None
        return self.mixture.denoise(x, sigma, labels).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma=0.0, labels=None) -> torch.Tensor:
        return self.mixture.log_prob(x, sigma, labels)

    def sample(self, n: int, rng: torch.Generator | None = None, labels=None):
        return self.mixture.sample(n, rng, labels)

    def class_posterior(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        return self.mixture.class_posterior(x, sigma)


def gmm_teacher(path: str, dtype: str = "float64", sigma_data: float = 0.5, cost=None,
                datamodule=None) -> GMMDenoiser:  # fmt: skip
    """``teacher=gmm_digits|gmm_mnist``: the exact denoiser of the mixture in ``path``. ``cost`` (reference,
    reference_parameters, forward) is the compute unit it defines: its forward's measured cost in forwards of
    the student network (:func:`distillbench.methods.accounting.compute_unit`)."""
    from distillbench.teachers.checkpoint import check_teacher_fits

    teacher = GMMDenoiser(load_mixture(path, dtype), sigma_data=sigma_data)
    teacher.name = f"gmm:{Path(path).name}"
    teacher.cost = None if cost is None else dict(cost)
    if datamodule is not None:
        check_teacher_fits(teacher, datamodule, teacher.name)
    return teacher.requires_grad_(False).eval()
