"""Hand-crafted image descriptors as backbones: HOG and LBP-RGB.

Both are batched, vectorised ``torch`` modules (no Python loop over pixels or images), so they
run wherever a CNN backbone does: ``landlens features extract --backbone hog``, ``landlens
retrieval evaluate -b lbp_rgb``, the feature cache. They are the hand-crafted baselines of the
residual-dyad metric-learning study (its Table II compares a Euclidean and a learned metric
over HoG, LBP-RGB, CNN and auto-encoder features).

- :class:`HOG`: Dalal & Triggs (2005), "Histograms of Oriented Gradients for Human Detection",
  CVPR, Sec. 6: ITU-R BT.601 luma, centred gradients ``[-1, 0, 1]``, unsigned orientations in
  9 bins over [0, 180), magnitude-weighted, 8x8-pixel cells, 2x2-cell blocks with a stride of
  one cell, L2-Hys block normalisation (L2, clip at 0.2, L2 again). It reproduces
  ``skimage.feature.hog(gray, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2),
  block_norm='L2-Hys', feature_vector=True)``: the same zero gradient on the image border, the
  same *hard* orientation binning (bin ``i`` holds angles in ``[20 i, 20 (i + 1))``), cell
  histograms averaged over the cell's pixels, the same ``eps = 1e-5`` and the same output
  order (block row, block column, cell row, cell column, orientation), given the luma image
  ``(299 R + 587 G + 114 B) / 255000`` of the 8-bit pixels (which this module forms in exact
  integer arithmetic, so equal lumas give a zero gradient, not a rounding-noise one that
  lands in bin 8 instead of bin 0). What differs: float32 arithmetic instead of float64
  (differences of order 1e-7; the tests allow 2e-6), and, with
  ``binning='linear'``, an orientation vote split between the two nearest bin centres (Dalal
  & Triggs' interpolation along orientation; skimage has none). Neither this module nor
  skimage applies Dalal & Triggs' spatial interpolation between cells or their Gaussian
  block window, and both take the gradient of one luma channel where Dalal & Triggs take the
  channel with the largest gradient.
- :class:`LBPRGB`: uniform rotation-invariant local binary patterns (Ojala, Pietikainen &
  Maenpaa (2002), "Multiresolution Gray-Scale and Rotation Invariant Texture Classification
  with Local Binary Patterns", IEEE TPAMI 24(7), Eqs. (9)-(10), ``LBP^riu2_{P,R}``) with
  P = 8, R = 1, computed on R, G and B separately; each channel's 10-bin code histogram
  (codes 0..P are the number of neighbours >= the centre of a uniform pattern, P + 1 every
  non-uniform one) is normalised to sum 1 and the three are concatenated (30-d), optionally
  per region of a g x g grid (g*g*30-d). The codes equal
  ``skimage.feature.local_binary_pattern(channel, P=8, R=1, method='uniform')`` of the 8-bit
  channel exactly: the diagonal neighbours sit at sub-pixel positions ``(-R sin(2 pi p / P),
  R cos(2 pi p / P))`` rounded to 5 decimals and are bilinearly interpolated with skimage's
  formula and evaluation order in float64, pixels outside the image count as 0 (float64 is
  needed: near-ties of order 1e-5 occur, below float32's resolution at 255; about 50 ms per
  256x256 image on a busy CPU core, HOG about 8 ms per 128x128 image).

Input: the normalised batch the extraction pipeline gives, (B, 3, H, W). The modules first
recover [0, 1] RGB pixels by undoing the backbone's :class:`Preprocessing` (mean, std, channel
order); the registry gives these backbones a preprocessing with mean 0 and std 1, so there is
nothing to undo unless the user overrides it. They have no weights: their identity
(:class:`WeightsInfo` ``source='builtin'``) is a digest of their settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landlens.errors import BackboneError
from landlens.models.preprocessing import Preprocessing
from landlens.models.base import Backbone

DESCRIPTOR_VERSION = 1
"""Bumped whenever a descriptor's output changes, so cached features are not reused."""

LUMA_BT601 = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B (what PIL's ``convert('L')`` uses)."""


class _Descriptor(nn.Module):
    """Base: recovers [0, 1] RGB pixels from a normalised batch; subclasses describe them."""

    name = "descriptor"

    def __init__(self, preprocessing: Preprocessing | None = None) -> None:
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.bgr = False
        if preprocessing is not None:
            self.set_input_normalization(preprocessing)

    def set_input_normalization(self, preprocessing: Preprocessing) -> None:
        """Undo ``preprocessing``'s mean, std and channel order on the way in."""
        if len(preprocessing.mean) != 3:
            raise BackboneError(f"{self.name} needs 3-channel (RGB) input, got mean {preprocessing.mean}")
        dev = self.in_mean.device
        self.in_mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        self.in_std = torch.tensor(preprocessing.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        self.bgr = preprocessing.channel_order == "BGR"

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> RGB pixels in [0, 1] (float32)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} expects a (B, 3, H, W) batch, got {tuple(x.shape)}")
        x = x.float() * self.in_std + self.in_mean
        return x.flip(1) if self.bgr else x

    def settings(self) -> dict[str, Any]:
        """Everything that determines the output (hashed into the weights digest)."""
        raise NotImplementedError

    def output_dim(self, size: int) -> int:
        """Length of the descriptor of a ``size`` x ``size`` input."""
        raise NotImplementedError

    def digest(self) -> str:
        """sha256 of :meth:`settings`: the descriptor's identity in feature stores and caches."""
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- HOG


class HOG(_Descriptor):
    """Histogram of oriented gradients (Dalal & Triggs 2005) of the luma image: (B, 3, H, W) -> (B, D).

    ``D = n_blocks_row * n_blocks_col * cells_per_block**2 * orientations`` with
    ``n_blocks = H // pixels_per_cell - cells_per_block + 1``: 15 * 15 * 2 * 2 * 9 = 8100 for a
    128x128 input. Pixels beyond the last whole cell are ignored (as in skimage).

    Args:
        orientations: number of unsigned orientation bins over [0, 180).
        pixels_per_cell: side of a square cell in pixels.
        cells_per_block: side of a square block in cells (blocks move by one cell).
        clip: L2-Hys clipping threshold.
        eps: added (squared) to each block's squared L2 norm, as in skimage.
        binning: ``'hard'`` (each pixel votes for the bin its angle falls in; skimage) or
            ``'linear'`` (the vote is split between the two nearest bin centres, circularly).
        levels: pixels are rounded to ``levels`` steps (``round(x * levels)``) and the luma is
            formed in exact integer arithmetic, ``(299 R + 587 G + 114 B) / (1000 levels)``,
            so two pixels of mathematically equal luma get equal values and a zero gradient
            (255 recovers the pipeline's 8-bit pixels). ``None`` forms the luma of the
            [0, 1] floats directly.
        preprocessing: the normalisation to undo (``None``: the input already is [0, 1] RGB).
    """

    name = "hog"

    def __init__(self, orientations: int = 9, pixels_per_cell: int = 8, cells_per_block: int = 2,
                 clip: float = 0.2, eps: float = 1e-5, binning: str = "hard", levels: int | None = 255,
                 preprocessing: Preprocessing | None = None) -> None:
        super().__init__(preprocessing)
        if orientations < 1 or pixels_per_cell < 1 or cells_per_block < 1:
            raise ValueError("orientations, pixels_per_cell and cells_per_block must be positive")
        if binning not in ("hard", "linear"):
            raise ValueError(f"binning must be 'hard' or 'linear', got {binning!r}")
        self.orientations = int(orientations)
        self.pixels_per_cell = int(pixels_per_cell)
        self.cells_per_block = int(cells_per_block)
        self.clip = float(clip)
        self.eps = float(eps)
        self.binning = binning
        self.levels = None if levels is None else int(levels)
        step = 180.0 / self.orientations
        luma = [round(1000 * c) for c in LUMA_BT601] if self.levels is not None else list(LUMA_BT601)
        self.register_buffer("luma", torch.tensor(luma, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # lower edges of bins 1..n-1: a pixel's bin is the number of edges its angle reaches
        self.register_buffer("edges", torch.tensor([step * i for i in range(1, self.orientations)],
                                                   dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("bins", torch.arange(self.orientations).view(1, -1, 1, 1), persistent=False)

    def settings(self) -> dict[str, Any]:
        return {"descriptor": "hog", "version": DESCRIPTOR_VERSION, "gray": "ITU-R BT.601",
                "gradient": "[-1, 0, 1]", "orientations": self.orientations, "signed": False,
                "pixels_per_cell": self.pixels_per_cell, "cells_per_block": self.cells_per_block,
                "block_norm": "L2-Hys", "clip": self.clip, "eps": self.eps, "binning": self.binning,
                "levels": self.levels}

    def output_dim(self, size: int) -> int:
        blocks = int(size) // self.pixels_per_cell - self.cells_per_block + 1
        if blocks < 1:
            need = self.pixels_per_cell * self.cells_per_block
            raise BackboneError(f"hog needs an input of at least {need} px (one block of "
                                f"{self.cells_per_block}x{self.cells_per_block} cells of {self.pixels_per_cell} px), "
                                f"got {size} px")
        return blocks * blocks * self.cells_per_block ** 2 * self.orientations

    def cell_histograms(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, H, W) -> cell histograms (B, orientations, H // cell, W // cell)."""
        if self.levels is not None:  # integer luma (exact in float32 up to 2**24), scaled after differencing
            gray = (torch.round(x * self.levels) * self.luma).sum(1)
            scale = 1.0 / (1000.0 * self.levels)
        else:
            gray, scale = (x * self.luma).sum(1), 1.0
        c = self.pixels_per_cell
        nr, nc = gray.shape[1] // c, gray.shape[2] // c
        if nr < self.cells_per_block or nc < self.cells_per_block:
            self.output_dim(min(gray.shape[1], gray.shape[2]))  # raises with the reason
        # centred differences, zero on the first/last row (column), as skimage's _hog_channel_gradient
        g_row = F.pad(gray[:, 2:, :] - gray[:, :-2, :], (0, 0, 1, 1))[:, : nr * c, : nc * c] * scale
        g_col = F.pad(gray[:, :, 2:] - gray[:, :, :-2], (1, 1, 0, 0))[:, : nr * c, : nc * c] * scale
        magnitude = torch.hypot(g_row, g_col).unsqueeze(1)
        # unsigned angle in [0, 180): turn the gradient into the upper half-plane first (the same
        # angle as skimage's atan2(...) % 180, without a float remainder near 0 and 180)
        flip = (g_row < 0) | ((g_row == 0) & (g_col < 0))
        angle = torch.rad2deg(torch.atan2(torch.where(flip, -g_row, g_row), torch.where(flip, -g_col, g_col)))
        angle = angle.unsqueeze(1)
        if self.binning == "hard":
            index = (angle >= self.edges).sum(1, keepdim=True)  # bin i: [step i, step (i + 1))
            votes = (index == self.bins).to(magnitude.dtype) * magnitude
        else:
            n = self.orientations
            pos = angle * (n / 180.0) - 0.5  # in bin-centre units: centre i sits at i
            lo = torch.floor(pos)
            w_hi = pos - lo
            lo_i = torch.remainder(lo.long(), n)
            hi_i = torch.remainder(lo_i + 1, n)
            votes = ((lo_i == self.bins).to(magnitude.dtype) * (1 - w_hi)
                     + (hi_i == self.bins).to(magnitude.dtype) * w_hi) * magnitude
        return F.avg_pool2d(votes, c)  # mean over the cell's pixels (skimage divides by the cell area)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.cell_histograms(self.pixels(x)).permute(0, 2, 3, 1)  # (B, nr, nc, n)
        b = self.cells_per_block
        # (B, nbr, nbc, n, b_row, b_col) -> (B, nbr, nbc, b_row, b_col, n): skimage's order
        blocks = cells.unfold(1, b, 1).unfold(2, b, 1).permute(0, 1, 2, 4, 5, 3)
        blocks = blocks.reshape(blocks.shape[0], blocks.shape[1], blocks.shape[2], -1)
        eps2 = self.eps ** 2
        blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps2)
        blocks = blocks.clamp(max=self.clip)
        blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps2)
        return blocks.flatten(1)


# --------------------------------------------------------------------------- LBP


def _lbp_offsets(points: int, radius: float) -> list[tuple[float, float]]:
    """Neighbour offsets (row, column) in skimage's order and rounding (5 decimals)."""
    angles = 2 * np.pi * np.arange(points, dtype=np.float64) / points
    rr = np.round(-radius * np.sin(angles), 5)
    cc = np.round(radius * np.cos(angles), 5)
    return [(float(r), float(c)) for r, c in zip(rr, cc)]


def lbp_uniform_codes(values: torch.Tensor, points: int = 8, radius: float = 1.0) -> torch.Tensor:
    """Uniform rotation-invariant LBP codes (Ojala et al. 2002, Eqs. (9)-(10)) of every pixel.

    Args:
        values: (..., H, W) grey values; computed in float64 (cast if needed).
        points: number of circular neighbours P.
        radius: circle radius R in pixels.

    Returns:
        int64 codes in ``0..P + 1`` of the same shape: the number of neighbours ``>=`` the
        centre for a uniform pattern (at most two 0/1 transitions around the circle), ``P + 1``
        otherwise. Neighbours off the pixel grid are bilinearly interpolated exactly as
        ``skimage.feature.local_binary_pattern(..., method='uniform')`` does (same offsets,
        same float64 formula and evaluation order; outside the image the value is 0), so the
        codes are identical to skimage's.
    """
    v = values.to(torch.float64)
    h, w = v.shape[-2], v.shape[-1]
    pad = int(math.ceil(radius)) + 1
    padded = F.pad(v, (pad, pad, pad, pad))  # constant 0: skimage's mode 'C', cval 0

    # skimage's bilinear_interpolation at (r + rp, c + cp): minr = floor(r + rp), maxr = ceil(...),
    # dr = (r + rp) - minr (likewise for columns); top = (1 - dc) * top_left + dc * top_right,
    # bottom alike, value = (1 - dr) * top + dr * bottom. The column step depends on (c, cp)
    # only, so it is done once per distinct cp over all (padded) rows and shared by the
    # neighbours above and below; a whole-pixel offset (dr or dc = 0) is exactly a shift.
    def weights(n: int, offset: float) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64, device=v.device) + offset
        return pos - torch.floor(pos)

    columns: dict[float, torch.Tensor] = {}

    def column_step(cp: float) -> torch.Tensor:  # (..., H + 2 pad, W)
        if cp not in columns:
            c0, c1 = math.floor(cp), math.ceil(cp)
            left = padded[..., pad + c0: pad + c0 + w]
            if c0 == c1:
                columns[cp] = left
            else:
                wc = weights(w, cp)
                columns[cp] = (1 - wc) * left + wc * padded[..., pad + c1: pad + c1 + w]
        return columns[cp]

    ones: torch.Tensor | None = None
    changes: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    for rp, cp in _lbp_offsets(points, radius):
        cols = column_step(cp)
        r0, r1 = math.floor(rp), math.ceil(rp)
        top = cols[..., pad + r0: pad + r0 + h, :]
        if r0 == r1:
            neighbour = top
        else:
            wr = weights(h, rp).view(h, 1)
            neighbour = (1 - wr) * top + wr * cols[..., pad + r1: pad + r1 + h, :]
        sign = neighbour >= v  # s(g_p - g_c): 1 where g_p - g_c >= 0
        bit = sign.to(torch.uint8)
        if previous is None:
            ones, changes = bit, torch.zeros_like(bit)
        else:
            assert ones is not None and changes is not None
            ones = ones + bit
            changes = changes + (sign != previous).to(torch.uint8)
        previous = sign
    assert ones is not None and changes is not None
    # 0/1 changes along the chain p = 0..P-1, as skimage counts them; with the wrap-around the
    # count is even, so "at most 2" here is Ojala's circular U <= 2
    code = torch.where(changes <= 2, ones, torch.full_like(ones, points + 1))
    return code.long()


class LBPRGB(_Descriptor):
    """Per-channel uniform LBP histograms of R, G and B: (B, 3, H, W) -> (B, grid**2 * 3 * (P + 2)).

    Output order: region (row-major over the ``grid`` x ``grid`` regions), channel (R, G, B),
    code (0..P + 1); every (region, channel) histogram sums to 1. Pixel row ``r`` belongs to
    region row ``floor(r * grid / H)`` (likewise for columns), so regions are equal when
    ``grid`` divides the side.

    Args:
        grid: regions per side (1: one global histogram per channel, 30-d).
        levels: pixels are rounded to ``levels`` steps (``round(x * levels)``) before the
            comparisons: 255 recovers the 8-bit values the pipeline decoded, so comparisons of
            equal neighbours tie exactly as skimage does on ``uint8`` images. ``None`` keeps
            the [0, 1] floats.
        points, radius: LBP neighbourhood (P, R).
        preprocessing: the normalisation to undo (``None``: the input already is [0, 1] RGB).
    """

    name = "lbp_rgb"

    def __init__(self, grid: int = 1, levels: int | None = 255, points: int = 8, radius: float = 1.0,
                 preprocessing: Preprocessing | None = None) -> None:
        super().__init__(preprocessing)
        if grid < 1 or points < 2 or radius <= 0:
            raise ValueError("grid must be >= 1, points >= 2 and radius > 0")
        self.grid = int(grid)
        self.levels = None if levels is None else int(levels)
        self.points = int(points)
        self.radius = float(radius)

    @property
    def n_codes(self) -> int:
        return self.points + 2

    def settings(self) -> dict[str, Any]:
        return {"descriptor": "lbp_rgb", "version": DESCRIPTOR_VERSION, "mapping": "uniform (riu2)",
                "points": self.points, "radius": self.radius, "grid": self.grid, "levels": self.levels,
                "channels": "R, G, B", "histogram": "per region and channel, sums to 1"}

    def output_dim(self, size: int) -> int:
        if int(size) < self.grid:
            raise BackboneError(f"lbp_rgb with a {self.grid}x{self.grid} grid needs at least {self.grid} px, "
                                f"got {size}")
        return self.grid * self.grid * 3 * self.n_codes

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, H, W) -> int64 LBP codes (B, 3, H, W)."""
        v = x.to(torch.float64)
        if self.levels is not None:
            v = torch.round(v * self.levels)
        return lbp_uniform_codes(v, self.points, self.radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.codes(self.pixels(x))
        b, ch, h, w = codes.shape
        g, k = self.grid, self.n_codes
        dev = codes.device
        region = ((torch.arange(h, device=dev) * g) // h).view(h, 1) * g + ((torch.arange(w, device=dev) * g) // w)
        index = ((torch.arange(b, device=dev).view(b, 1, 1, 1) * (g * g) + region) * ch
                 + torch.arange(ch, device=dev).view(1, ch, 1, 1)) * k + codes
        index = index.reshape(-1)
        counts = torch.zeros(b * g * g * ch * k, dtype=torch.float32, device=dev)
        counts = counts.index_add(0, index, torch.ones(1, dtype=torch.float32, device=dev).expand(index.numel()))
        hist = counts.view(b, g * g, ch, k)
        return (hist / hist.sum(-1, keepdim=True)).flatten(1)


# --------------------------------------------------------------------------- registry glue

_DESCRIPTORS: dict[str, tuple[type[_Descriptor], dict[str, Any]]] = {
    "hog": (HOG, {}),
    "lbp_rgb": (LBPRGB, {"grid": 1}),
    "lbp_rgb_g2": (LBPRGB, {"grid": 2}),
}


def build_descriptor(arch: str, preprocessing: Preprocessing) -> tuple[_Descriptor, int]:
    """The descriptor module ``arch`` for inputs under ``preprocessing`` and its output length."""
    if arch not in _DESCRIPTORS:
        raise BackboneError(f"no hand-crafted descriptor {arch!r}; known: {', '.join(sorted(_DESCRIPTORS))}")
    cls, kwargs = _DESCRIPTORS[arch]
    module = cls(preprocessing=preprocessing, **kwargs).eval()
    return module, module.output_dim(preprocessing.input_size)


class HandcraftedBackbone(Backbone):
    """A :class:`Backbone` around a descriptor: its length follows the current input size and
    its input normalisation follows the current preprocessing (``landlens ... --input-size``
    replaces ``preprocessing`` after the backbone is built)."""

    body: _Descriptor

    @property  # type: ignore[override]
    def num_features(self) -> int:
        return self.body.output_dim(self.preprocessing.input_size)

    @num_features.setter
    def num_features(self, value: int) -> None:  # Backbone.__init__ sets it; derived instead
        pass

    @property  # type: ignore[override]
    def preprocessing(self) -> Preprocessing:
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing) -> None:
        self.body.set_input_normalization(value)
        self._preprocessing = value


__all__ = [
    "DESCRIPTOR_VERSION",
    "HOG",
    "LBPRGB",
    "LUMA_BT601",
    "HandcraftedBackbone",
    "build_descriptor",
    "lbp_uniform_codes",
]
