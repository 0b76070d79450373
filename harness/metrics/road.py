"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and
Efficient Evaluation Strategy for Attribution Methods", ICML 2022).

Removing pixels by painting them with a constant (deletion's canvas, AD/IC's black) leaks
the removed *shape* to the classifier; ROAD instead imputes each removed pixel from its
neighbours (noisy linear imputation), so that the mask itself carries no class
information, and needs no retraining. For an image X (3, H, W) in [0, 1], its map V, the
explained class c and a removal share q (a ``percentages`` entry), with P = H * W pixels
and n = ceil(q * P):

    MoRF (most relevant first):  R = the n highest pixels of V
    LeRF (least relevant first): R = the n lowest pixels of V
        (ties: docs/protocol.md 2.1 as for deletion, ``harness.metrics.causal.pixel_ranks``:
        the earliest pixels in raster order rank lowest; maps sanitised as for AD/IC)

    imputation: every pixel i in R gets the value x_i that solves, per channel,
        sum_{j in N(i)} w_j (x_i - x_j) = 0,    w = 1/6 (4-neighbours), 1/12 (diagonals),
    N(i) the 8 neighbours inside the image, x_j = X_j for the kept ones and the unknowns
    for those in R: one sparse linear system over R (each x_i the weighted mean of its
    neighbours), solved exactly (scipy's sparse LU, float64); then
        x_i += noise * e_i,   e_i ~ N(0, 1) from a generator seeded by (seed, the image's
        position in the data set, ordering, share): the same numbers in any shard layout
    p(q)  = score of c on the imputed image (softmax probability, or the logit)

    road_morf = mean_q p_MoRF(q)   (lower is better: removing the relevant pixels first
                                    should destroy the class quickly)
    road_lerf = mean_q p_LeRF(q)   (higher is better)
    road_combined = (road_lerf - road_morf) / 2   (higher is better; pytorch-grad-cam's
                                    ``ROADCombined``, whose terms are score changes against
                                    the clean image: the clean score cancels)

Shares: 10%, 20%, ..., 90% by default, pytorch-grad-cam's ``percentiles`` (its road.py takes
them, with the imputer, from the authors' road_evaluation code); its threshold
``np.percentile(V, p)`` removes the pixels at or above the p-th percentile, i.e. 1 - p/100
of them, as the share q = 1 - p/100 here, in both orderings (its LeRF thresholds 1 - V).
The counts differ by its interpolated threshold: n = ``ceil(q * P)`` here (the rule of
AD/IC's kept count and of deletion's steps, computed exactly from the decimal share),
``P - ceil(p/100 * (P - 1))`` there (for distinct map values), which is n or n - 1: equal
at 10, 20, 30, 40, 50, 60 and 80% of 16 x 16 or 224 x 224 pixels, one pixel fewer there at
70% and 90% (at 16 x 16: tests/metrics/test_road.py). ``noise`` 0.01 is the imputer's
default there too, but it is added here in [0, 1] pixel units (pytorch-grad-cam adds it to
whatever tensor the model takes, usually the normalised one); the linear part is the same
in either (a per-channel affine map commutes with the weighted mean). Cost: 2 * len(shares)
forwards per image (``road_forward_passes``), scored ``batch_size`` images at a time; the
imputation runs on the CPU.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from harness.metrics.base import Metric, MetricSettings, Reported
from harness.metrics.causal import pixel_ranks
from harness.metrics.registry import register

#: (row offset, column offset) -> weight of the neighbour in the imputation
NEIGHBOURS = {(-1, 0): 1 / 6, (1, 0): 1 / 6, (0, -1): 1 / 6, (0, 1): 1 / 6,
              (-1, -1): 1 / 12, (-1, 1): 1 / 12, (1, -1): 1 / 12, (1, 1): 1 / 12}
ORDERINGS = ("morf", "lerf")


def impute(image: torch.Tensor, removed: torch.Tensor, noise: float = 0.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The image (C, H, W) with the pixels of ``removed`` (H, W bool) replaced by their
    noisy linear imputation (module docstring); the kept pixels are returned unchanged."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve
    c, h, w = image.shape
    flat_removed = removed.reshape(-1).cpu().numpy().astype(bool)
    unknown = np.flatnonzero(flat_removed)
    if unknown.size == 0:
        return image.clone()
    values = image.detach().reshape(c, -1).cpu().double().numpy()
    slot = np.full(h * w, -1, dtype=np.int64)
    slot[unknown] = np.arange(unknown.size)
    rows_u, cols_u = np.divmod(unknown, w)
    diagonal = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, c))
    entries_i, entries_j, entries_v = [], [], []
    for (dr, dc), weight in NEIGHBOURS.items():
        r, q = rows_u + dr, cols_u + dc
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
        here = np.flatnonzero(inside)
        other = r[inside] * w + q[inside]
        diagonal[here] += weight                 # sum of the weights inside the image
        missing = flat_removed[other]
        entries_i.append(here[missing])          # an unknown neighbour: a matrix entry
        entries_j.append(slot[other[missing]])
        entries_v.append(np.full(int(missing.sum()), -weight))
        rhs[here[~missing]] += weight * values[:, other[~missing]].T   # a kept one: the rhs
    n = unknown.size
    idx = np.arange(n)
    matrix = coo_matrix((np.concatenate([diagonal, *entries_v]),
                         (np.concatenate([idx, *entries_i]), np.concatenate([idx, *entries_j]))),
                        shape=(n, n)).tocsc()
    solved = np.asarray(spsolve(matrix, rhs)).reshape(n, c).T       # (C, n)
    out = image.detach().reshape(c, -1).clone()
    fill = torch.as_tensor(solved, dtype=out.dtype).to(out.device)
    if noise:
        draw = torch.randn(fill.shape, generator=generator, dtype=torch.float64)
        fill = fill + (noise * draw).to(out.dtype).to(out.device)
    out[:, torch.as_tensor(unknown, device=out.device)] = fill
    return out.reshape(c, h, w)


def removed_pixels(saliency: torch.Tensor, share: float, ordering: str) -> torch.Tensor:
    """(B, H, W) maps -> (B, H, W) bool: the n = ceil(share * H * W) pixels ROAD removes,
    the highest (``morf``) or the lowest (``lerf``) of each map."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
    b, h, w = saliency.shape
    n = math.ceil(Fraction(str(share)) * (h * w))     # exact: 0.07 * 100 is 7, not 8
    ranks = pixel_ranks(saliency)
    removed = ranks >= h * w - n if ordering == "morf" else ranks < n
    return removed.view(b, h, w)


def _seed(seed: int, position: int, ordering: str, step: int) -> int:
    return ((seed * 1_000_003 + position) * 2 + ORDERINGS.index(ordering)) * 1009 + step


@torch.no_grad()
def road_scores(backbone, images: torch.Tensor, saliency: torch.Tensor, targets, shares,
                noise: float = 0.01, score: str = "prob", seed: int = 0,
                positions=None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{'morf': (B, S), 'lerf': (B, S)} float64: the class score on each imputed image, per
    share (module docstring). ``positions``: each image's position in the data set (seeds)."""
    b = images.shape[0]
    positions = list(range(b)) if positions is None else list(positions)
    targets = torch.as_tensor(targets, device=images.device).long()
    sal = saliency.to(images.device)
    jobs = [(o, s, i) for o in ORDERINGS for s in range(len(shares)) for i in range(b)]
    removed = {(o, s): removed_pixels(sal, float(q), o) for o in ORDERINGS
               for s, q in enumerate(shares)}
    out = {o: torch.empty(b, len(shares), dtype=torch.float64) for o in ORDERINGS}
    for start in range(0, len(jobs), batch_size):
        part = jobs[start:start + batch_size]
        x = torch.stack([impute(images[i], removed[(o, s)][i], noise, torch.Generator().
                                manual_seed(_seed(seed, positions[i], o, s)))
                         for o, s, i in part]).to(images.device)
        logits = backbone(x).float()
        values = logits.softmax(dim=1) if score == "prob" else logits
        picked = values.gather(1, targets[[i for _, _, i in part]][:, None])[:, 0]
        for (o, s, i), v in zip(part, picked.double().cpu()):
            out[o][i, s] = v
    return out


class ROADSettings(MetricSettings):
    """ROAD's settings (a spec entry ``{name: road, percentages: [...], ...}``)."""

    percentages: tuple[float, ...] = Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), min_length=1, description=(
            "shares of the pixels removed, each in (0, 1) (pytorch-grad-cam's 10..90%)"))
    noise: float = Field(0.01, ge=0, le=1, description=(
        "standard deviation of the imputation's noise, in [0, 1] pixel units"))
    score: Literal["prob", "logit"] = Field("prob", description=(
        "the class score: softmax probability or logit"))
    seed: int = Field(0, ge=0, description="seeds the imputation noise (with each image)")
    batch_size: int = Field(64, ge=1, description="imputed images per forward")

    @field_validator("percentages")
    @classmethod
    def _shares(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        for i, v in enumerate(values):
            if not 0 < v < 1:
                raise cls.problem(f"{v:g} is not a share in (0, 1) (write 0.1 for 10%)", [i])
            if v in values[:i]:
                raise cls.problem(f"{v:g} is listed twice", [i])
        return values


@register
class ROAD(Metric):
    """ROAD's MoRF and LeRF scores per image (module docstring)."""

    name = "road"
    display_name = "ROAD"
    paper = ("Rong et al., A Consistent and Efficient Evaluation Strategy for Attribution "
             "Methods (ROAD), ICML 2022")
    Settings = ROADSettings
    reported = (Reported("road_morf", "lower", "ROAD-MoRF↓", column="road_morf", digits=3,
                         label="ROAD MoRF"),
                Reported("road_lerf", "higher", "ROAD-LeRF↑", column="road_lerf", digits=3,
                         label="ROAD LeRF"),
                Reported("road_combined", "higher", "ROAD↑", column="road_combined",
                         table=False, digits=3, label="ROAD"))

    def columns(self) -> tuple[str, ...]:
        return ("road_morf", "road_lerf", "road_combined", "road_forward_passes")

    def forward_passes(self, size=None) -> int:
        return 2 * len(self.settings.percentages)

    def score(self, batch) -> dict[str, list[float]]:
        s = self.settings
        found = road_scores(batch.backbone, batch.images, batch.saliency, batch.targets,
                            s.percentages, s.noise, s.score, s.seed, batch.positions(),
                            s.batch_size)
        morf, lerf = found["morf"].mean(dim=1), found["lerf"].mean(dim=1)
        return {"road_morf": [float(v) for v in morf], "road_lerf": [float(v) for v in lerf],
                "road_combined": [float(v) for v in (lerf - morf) / 2],
                "road_forward_passes": [float(self.forward_passes())] * len(morf)}


__all__ = ["NEIGHBOURS", "ORDERINGS", "ROAD", "ROADSettings", "impute", "removed_pixels",
           "road_scores"]
