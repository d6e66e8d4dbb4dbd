"""Training augmentations as the seed recipes use them, vectorised over the batch.

Each augmentation is a small callable over a batch (``[B, ...]``) drawing its randomness from a
``torch.Generator``: the one passed to the call, else its own (``seed=...``), else torch's global RNG. The
datasets pass each item's own generator, so per-item use inside DataLoader workers stays reproducible.

Sample-keyed randomness (training): pass :class:`SampleGenerators`, one generator per row keyed by
``(seed, epoch, sample)``, instead of one generator. Every draw is then made row by row from the row's own
generator, so a sample is augmented the same way whichever batch, rank or world size it lands in: N processes
reproduce the 1-process run. Mixup pairs rows ``(0, 1), (2, 3), ...`` of the batch (the partner of an unpaired
last row is itself); consecutive positions of a shuffled global batch are random partners, and a pair stays on
one rank whenever the per-rank batch is even.

- :class:`Mixup`: waveform mixup with label mixing (AST/DASS: lambda ~ Beta(10, 10), mean removal).
- :class:`SpecAugment`: frequency and time masks like torchaudio's FrequencyMasking/TimeMasking.
- :class:`AddNoise`: noise (white or a recording, e.g. babble) at an SNR in dB.
- :class:`NoiseRoll`: AST's ``noise=True`` feature augmentation (uniform noise, then a time roll in [-10, 9]).
- :class:`RandomGain`, :class:`TimeRoll`; :class:`Compose` chains augmentations.
- :class:`LogMelMix` (with :func:`mix_log_mel`): mixing, gain and spectral tilt applied to ``log(mel + floor)``
  features as if to the waveforms (powers add, as they do on average for sources of unrelated phase). The default model's trainer uses it for
  function matching: the teacher labels each augmented patch exactly as the student sees it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "AddNoise",
    "Augmentation",
    "Compose",
    "LogMelMix",
    "Mixup",
    "NoiseRoll",
    "RandomGain",
    "SampleGenerators",
    "SpecAugment",
    "TimeRoll",
    "length_mask",
    "mask_along_axis",
    "mix_batch",
    "mix_log_mel",
    "roll_along",
    "sample_beta",
    "sample_gamma",
]


# ------------------------------------------------------------------------------------ random draws
class SampleGenerators:
    """One CPU generator per row of a batch: sample-keyed randomness (see the module docstring).

    >>> generators = SampleGenerators.keyed(seed, epoch, positions)   # positions: each row's place in the epoch
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)
        if not self.generators:
            raise ValueError("SampleGenerators needs at least one generator")

    @classmethod
    def keyed(cls, seed: int, epoch: int, positions: Sequence[int]) -> "SampleGenerators":
        """Generators seeded by ``(seed, epoch, position)`` for each position."""
        from tympan.data.sampling import seeded_generator

        return cls([seeded_generator(seed, epoch, int(p)) for p in positions])

    def __len__(self) -> int:
        return len(self.generators)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


Randomness = Union[torch.Generator, SampleGenerators, None]  # what the augmentations draw from


def _per_sample(shape: Sequence[int], generators: SampleGenerators, draw) -> Tensor:
    """Stack the draws of each row's generator (`draw(row_shape, generator)`) into `shape`."""
    if not shape or shape[0] != len(generators):
        raise ValueError(f"{len(generators)} sample generators for a batch of shape {tuple(shape)}")
    return torch.stack([draw(tuple(shape[1:]), g) for g in generators.generators])


def _device_of(generator: torch.Generator | SampleGenerators | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _rand(shape: Sequence[int], generator: torch.Generator | SampleGenerators | None, device: torch.device,
          dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """Uniform [0, 1) drawn on the generator's device, returned on `device`."""
    if isinstance(generator, SampleGenerators):
        return _per_sample(shape, generator, lambda s, g: torch.rand(s, generator=g, dtype=dtype)).to(device)
    return torch.rand(tuple(shape), generator=generator, device=_device_of(generator, device), dtype=dtype).to(device)


def _randn(shape: Sequence[int], generator: torch.Generator | SampleGenerators | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    if isinstance(generator, SampleGenerators):
        return _per_sample(shape, generator, lambda s, g: torch.randn(s, generator=g, dtype=dtype)).to(device)
    return torch.randn(tuple(shape), generator=generator, device=_device_of(generator, device), dtype=dtype).to(device)


def _randint(low: int, high: int, shape: Sequence[int], generator: torch.Generator | SampleGenerators | None,
             device: torch.device) -> Tensor:  # fmt: skip
    if isinstance(generator, SampleGenerators):
        return _per_sample(shape, generator, lambda s, g: torch.randint(low, high, s, generator=g)).to(device)
    return torch.randint(low, high, tuple(shape), generator=generator, device=_device_of(generator, device)).to(device)


def sample_gamma(concentration: float, shape: Sequence[int], generator: Randomness = None,
                 device: torch.device | str = "cpu") -> Tensor:  # fmt: skip
    """Gamma(concentration, 1) samples (float64) from `generator`: Marsaglia-Tsang, vectorised rejection.

    (``torch.distributions`` cannot take a generator; this can.) Concentrations below 1 use the boost
    ``Gamma(a) = Gamma(a + 1) * U ** (1 / a)``.
    """
    if not concentration > 0:
        raise ValueError(f"concentration must be positive, got {concentration!r}")
    device = torch.device(device)
    if isinstance(generator, SampleGenerators):  # row by row, each from its own generator
        return _per_sample(shape, generator, lambda s, g: sample_gamma(concentration, s, g, "cpu")).to(device)
    shape_a = concentration + 1.0 if concentration < 1 else concentration
    d = shape_a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    count = math.prod(shape)
    out = torch.empty(count, dtype=torch.float64, device=device)
    pending = torch.arange(count, device=device)
    while pending.numel():  # each round accepts > 95 % of what is left
        x = _randn((pending.numel(),), generator, device, torch.float64)
        u = _rand((pending.numel(),), generator, device, torch.float64)
        v = (1.0 + c * x) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[pending[accept]] = d * v[accept]
        pending = pending[~accept]
    if concentration < 1:
        out = out * _rand((count,), generator, device, torch.float64) ** (1.0 / concentration)
    return out.view(tuple(shape))


def sample_beta(alpha: float, beta: float, shape: Sequence[int], generator: Randomness = None,
                device: torch.device | str = "cpu") -> Tensor:  # fmt: skip
    """Beta(alpha, beta) samples (float32) as ``X / (X + Y)`` of two gamma draws."""
    x = sample_gamma(alpha, shape, generator, device)
    y = sample_gamma(beta, shape, generator, device)
    return (x / (x + y)).float()


# ------------------------------------------------------------------------------------ functional core
def length_mask(lengths: Tensor | None, size: int, batch: int, device: torch.device) -> Tensor:
    """Boolean ``[B, size]``: True at positions below each row's length (all True without lengths)."""
    if lengths is None:
        return torch.ones(batch, size, dtype=torch.bool, device=device)
    return torch.arange(size, device=device) < lengths.to(device)[:, None]


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against `like`."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _time_mask_like(valid: Tensor, like: Tensor) -> Tensor:
    """``[B, N]`` -> ``[B, 1, ..., N]`` broadcastable against `like` (time on the last axis)."""
    return valid.view(valid.shape[0], *([1] * (like.ndim - 2)), valid.shape[1])


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid positions of each row (all axes but the batch), shaped like `_per_row`."""
    weights = valid.to(x.dtype).expand_as(x)
    dims = tuple(range(1, x.ndim))
    return (x * weights).sum(dims, keepdim=True) / weights.sum(dims, keepdim=True).clamp_min(1)


def mix_batch(waveform: Tensor, target: Tensor, lam: Tensor, partner: Tensor, lengths: Tensor | None = None,
              remove_mean: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Mix each row with row ``partner[i]``: ``lam * x1 + (1 - lam) * x2`` and likewise for the targets.

    As AST's dataloader: with `remove_mean` both clips lose their mean first and the mix loses its mean again;
    the partner is cut (zeroed) to the first clip's valid length, padding stays zero. A label both clips carry
    gets ``lam + (1 - lam) = 1``.
    """
    valid = _time_mask_like(length_mask(lengths, waveform.shape[-1], waveform.shape[0], waveform.device), waveform)
    x = waveform * valid
    if remove_mean:
        x = (x - _masked_mean(x, valid)) * valid
    weight = _per_row(lam, x)
    mixed = weight * x + (1 - weight) * x[partner] * valid
    if remove_mean:
        mixed = (mixed - _masked_mean(mixed, valid)) * valid
    mix_weight = _per_row(lam, target)
    return mixed, mix_weight * target + (1 - mix_weight) * target[partner]


def mask_along_axis(x: Tensor, axis: int, max_width: int, num_masks: int = 1, mask_value: float = 0.0,
                    generator: Randomness = None) -> Tensor:  # fmt: skip
    """Per row of the batch, set `num_masks` bands of `axis` to `mask_value`.

    Each band's width is uniform in ``[0, max_width)`` (capped at the axis size) and its start uniform over the
    positions where it fits, like torchaudio's ``FrequencyMasking``/``TimeMasking`` with ``iid_masks``.
    """
    if max_width <= 0 or num_masks <= 0:
        return x
    axis = axis % x.ndim
    if axis == 0:
        raise ValueError("cannot mask along the batch axis")
    batch, size = x.shape[0], x.shape[axis]
    width = (_rand((batch, num_masks), generator, x.device) * max_width).long().clamp_max(size)
    start = (_rand((batch, num_masks), generator, x.device) * (size - width + 1)).long()
    position = torch.arange(size, device=x.device)
    band = (position >= start[..., None]) & (position < (start + width)[..., None])  # [B, M, size]
    mask = band.any(1).view(batch, *[size if d == axis else 1 for d in range(1, x.ndim)])
    return x.masked_fill(mask, mask_value)


def roll_along(x: Tensor, shifts: Tensor, axis: int) -> Tensor:
    """``torch.roll`` of each row by its own shift along `axis` (``out[i] = x[(i - shift) % size]``)."""
    axis = axis % x.ndim
    moved = x.movedim(axis, -1)
    size = moved.shape[-1]
    source = (torch.arange(size, device=x.device) - shifts.to(x.device)[:, None]) % size  # [B, size]
    source = source.view(x.shape[0], *([1] * (moved.ndim - 2)), size).expand_as(moved)
    return moved.gather(-1, source).movedim(-1, axis)


# ------------------------------------------------------------------------------------ callables
class Augmentation:
    """Base class: holds an optional seeded generator; a generator passed to the call takes precedence."""

    def __init__(self, seed: int | None = None) -> None:
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _generator(self, generator: Randomness) -> Randomness:
        return generator if generator is not None else self.generator

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "generator" and not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Mixup(Augmentation):
    """Batch mixup of waveforms and targets; the partner of row i is row ``perm[i]`` of a random permutation.

    Each row draws its own ``lambda ~ Beta(alpha, alpha)`` and is mixed with probability `prob` (AST: 0.5 on
    AudioSet, 0.6 on Speech Commands; alpha 10). Returns ``(mixed_waveform, mixed_target)``; see
    :func:`mix_batch` for the mean removal and for `lengths` (valid samples per row of a padded batch).
    """

    def __init__(self, alpha: float = 10.0, prob: float = 1.0, remove_mean: bool = True, seed: int | None = None):
        super().__init__(seed)
        if not alpha > 0 or not 0 <= prob <= 1:
            raise ValueError(f"need alpha > 0 and 0 <= prob <= 1, got alpha={alpha!r}, prob={prob!r}")
        self.alpha, self.prob, self.remove_mean = alpha, prob, remove_mean

    def __call__(self, waveform: Tensor, target: Tensor, lengths: Tensor | None = None,
                 generator: Randomness = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        generator = self._generator(generator)
        batch = waveform.shape[0]
        if isinstance(generator, SampleGenerators):  # fixed pairs, so that a row's partner is not rank-dependent
            partner = torch.arange(batch) ^ 1
            partner[partner >= batch] = batch - 1
        else:
            partner = torch.randperm(batch, generator=generator, device=_device_of(generator, waveform.device))
        lam = sample_beta(self.alpha, self.alpha, (batch,), generator, _device_of(generator, waveform.device))
        mixed = _rand((batch,), generator, waveform.device) < self.prob
        lam = torch.where(mixed, lam.to(waveform.device), torch.ones_like(lam, device=waveform.device))
        return mix_batch(waveform, target, lam, partner.to(waveform.device), lengths, self.remove_mean)


class SpecAugment(Augmentation):
    """Frequency then time masking of a spectrogram batch, one band per mask, value `mask_value`.

    `layout` is ``"BTF"`` (``[B, T, F]``, AST's fbank) or ``"BFT"`` (``[B, F, T]``, or ``[B, C, F, T]``).
    Widths are uniform in ``[0, freq_mask)`` and ``[0, time_mask)``; a parameter of 0 disables that mask.
    Recipes: AST AudioSet 48/192, ESC-50 24/96, Speech Commands 48/48 (before normalisation, value 0).
    """

    def __init__(self, freq_mask: int = 48, time_mask: int = 192, num_freq_masks: int = 1, num_time_masks: int = 1,
                 layout: str = "BTF", mask_value: float = 0.0, seed: int | None = None) -> None:  # fmt: skip
        super().__init__(seed)
        if layout not in ("BTF", "BFT"):
            raise ValueError(f"layout must be 'BTF' or 'BFT', got {layout!r}")
        self.freq_mask, self.time_mask = freq_mask, time_mask
        self.num_freq_masks, self.num_time_masks = num_freq_masks, num_time_masks
        self.layout, self.mask_value = layout, mask_value

    def __call__(self, spectrogram: Tensor, generator: Randomness = None) -> Tensor:
        if spectrogram.ndim < 3:
            raise ValueError(f"expected a batch [B, T, F] or [B, F, T], got shape {tuple(spectrogram.shape)}")
        generator = self._generator(generator)
        freq_axis, time_axis = (-1, -2) if self.layout == "BTF" else (-2, -1)
        out = mask_along_axis(spectrogram, freq_axis, self.freq_mask, self.num_freq_masks, self.mask_value, generator)
        return mask_along_axis(out, time_axis, self.time_mask, self.num_time_masks, self.mask_value, generator)


class TimeRoll(Augmentation):
    """Roll each row along `axis` by an integer shift uniform in ``[-max_shift, max_shift)``."""

    def __init__(self, max_shift: int, axis: int = -1, seed: int | None = None) -> None:
        super().__init__(seed)
        self.max_shift, self.axis = max_shift, axis

    def __call__(self, x: Tensor, generator: Randomness = None) -> Tensor:
        shifts = _randint(-self.max_shift, self.max_shift, (x.shape[0],), self._generator(generator), x.device)
        return roll_along(x, shifts, self.axis)


class NoiseRoll(Augmentation):
    """AST's ``noise=True`` augmentation of normalised features ``[B, T, F]``: add ``U[0, 1)`` noise scaled by
    a per-clip factor ``U[0, scale)`` (0.1), then roll along time by an integer in ``[-max_shift, max_shift)``."""

    def __init__(self, scale: float = 0.1, max_shift: int = 10, time_axis: int = -2, seed: int | None = None) -> None:
        super().__init__(seed)
        self.scale, self.max_shift, self.time_axis = scale, max_shift, time_axis

    def __call__(self, features: Tensor, generator: Randomness = None) -> Tensor:
        generator = self._generator(generator)
        factor = _rand((features.shape[0],), generator, features.device) * self.scale
        noisy = features + _rand(features.shape, generator, features.device) * _per_row(factor, features)
        shifts = _randint(-self.max_shift, self.max_shift, (features.shape[0],), generator, features.device)
        return roll_along(noisy, shifts, self.time_axis)


class RandomGain(Augmentation):
    """Scale each row by a gain uniform in ``[min_db, max_db]`` dB (Dasheng's ``add_gain``: -6..+10)."""

    def __init__(self, min_db: float = -6.0, max_db: float = 10.0, seed: int | None = None) -> None:
        super().__init__(seed)
        if min_db > max_db:
            raise ValueError(f"min_db must not exceed max_db, got {min_db} > {max_db}")
        self.min_db, self.max_db = min_db, max_db

    def __call__(self, x: Tensor, generator: Randomness = None) -> Tensor:
        gain_db = self.min_db + (self.max_db - self.min_db) * _rand((x.shape[0],), self._generator(generator), x.device)
        return x * _per_row(10.0 ** (gain_db / 20.0), x)


class AddNoise(Augmentation):
    """Add noise at a signal-to-noise ratio in dB (a number, or ``(low, high)`` drawn uniformly per row).

    The noise is white Gaussian, or random excerpts of a `noise` recording ``[M]`` (looped when shorter than
    the batch). Signal power is measured over each row's valid samples (`lengths`); padding stays zero.
    """

    def __init__(self, snr_db: float | tuple[float, float] = (5.0, 20.0), noise: Tensor | None = None,
                 seed: int | None = None) -> None:  # fmt: skip
        super().__init__(seed)
        self.snr_db = (float(snr_db), float(snr_db)) if isinstance(snr_db, (int, float)) else tuple(map(float, snr_db))
        if noise is not None and (noise.ndim != 1 or not noise.numel() or not bool(noise.abs().max() > 0)):
            raise ValueError("noise must be a non-silent 1-D recording")
        self.noise = noise

    def _excerpts(self, batch: int, size: int, generator: Randomness, device: torch.device) -> Tensor:
        if self.noise is None:
            return _randn((batch, size), generator, device)
        noise = self.noise.to(device, torch.float32)
        if noise.numel() < size:
            noise = noise.repeat(math.ceil(size / noise.numel()))
        offsets = (_rand((batch,), generator, device) * (noise.numel() - size + 1)).long()
        return noise[offsets[:, None] + torch.arange(size, device=device)]

    def __call__(self, waveform: Tensor, lengths: Tensor | None = None,
                 generator: Randomness = None) -> Tensor:  # fmt: skip
        generator = self._generator(generator)
        batch, size = waveform.shape[0], waveform.shape[-1]
        valid = _time_mask_like(length_mask(lengths, size, batch, waveform.device), waveform)
        noise = self._excerpts(batch, size, generator, waveform.device).to(waveform.dtype)
        noise = _time_mask_like(noise, waveform) * valid
        low, high = self.snr_db
        snr = low + (high - low) * _rand((batch,), generator, waveform.device)
        signal_power = _masked_mean(waveform.square(), valid)
        noise_power = _masked_mean(noise.square(), valid).clamp_min(1e-20)
        scale = torch.sqrt(signal_power / (noise_power * _per_row(10.0 ** (snr / 10.0), waveform)))
        return waveform + scale * noise


class Compose(Augmentation):
    """Apply augmentations in order, sharing one generator (e.g. ``Compose(RandomGain(), AddNoise())``)."""

    def __init__(self, *augmentations: Augmentation, seed: int | None = None) -> None:
        super().__init__(seed)
        self.augmentations = augmentations

    def __call__(self, x: Tensor, generator: Randomness = None) -> Tensor:
        generator = self._generator(generator)
        for augmentation in self.augmentations:
            x = augmentation(x, generator=generator)
        return x


# ------------------------------------------------------------------------------------ log-mel domain
def mix_log_mel(x: Tensor, partner: Tensor | None = None, snr_db: Tensor | None = None, gain_db: Tensor | None = None,
                tilt_db: Tensor | None = None, floor: float = 1e-3) -> Tensor:  # fmt: skip
    """Mix, scale and tilt log-mel features ``x = log(mel + floor)`` ``[B, ..., F]`` in the magnitude domain.

    ``mel = max(exp(x) - floor, 0)``; the partner's magnitudes are scaled so that the energy ratio of the two is
    ``snr_db`` per row (rows with ``snr_db = +inf`` or no partner are not mixed) and combined as
    ``sqrt(mel^2 + (s mel_partner)^2)``: exact where the sources do not overlap in time-frequency, the expected
    power where they do (phase is not known; adding magnitudes instead overestimates by ~0.2 in log on real
    mixtures, this by ~0.03). The result is scaled by ``gain_db`` (exact) and by a linear tilt across the F bands
    from ``-tilt_db / 2`` (lowest band) to ``+tilt_db / 2`` dB (highest), then ``log(mel' + floor)``. Per-row
    parameters are ``[B]`` tensors.
    """
    mel = (x.float().exp() - floor).clamp_min(0.0)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if partner is not None and snr_db is not None:
        other = (partner.float().exp() - floor).clamp_min(0.0)
        dims = tuple(range(1, x.ndim))
        power, other_power = mel.square().mean(dims), other.square().mean(dims).clamp_min(1e-20)
        scale = torch.sqrt(power.clamp_min(1e-20) / other_power * 10.0 ** (-snr_db.float() / 10.0))
        scale = torch.where(torch.isfinite(snr_db), scale, torch.zeros_like(scale))
        mel = torch.sqrt(mel.square() + (scale.view(shape) * other).square())
    if gain_db is not None:
        mel = mel * (10.0 ** (gain_db.float() / 20.0)).view(shape)
    if tilt_db is not None:
        ramp = torch.linspace(-0.5, 0.5, x.shape[-1], device=x.device)
        mel = mel * 10.0 ** (tilt_db.float().view(shape) * ramp / 20.0)
    return torch.log(mel + floor)


class LogMelMix(Augmentation):
    """Draws :func:`mix_log_mel`'s parameters per row: with probability `mix_prob` a partner (given by the caller)
    at an SNR uniform in `snr_db`, a gain uniform in `gain_db` and a tilt uniform in ``[-tilt_db, tilt_db]``."""

    def __init__(self, mix_prob: float = 0.5, snr_db: tuple[float, float] = (-5.0, 15.0),
                 gain_db: tuple[float, float] = (-20.0, 6.0), tilt_db: float = 6.0, floor: float = 1e-3,
                 seed: int | None = None) -> None:  # fmt: skip
        super().__init__(seed)
        if not 0 <= mix_prob <= 1 or snr_db[0] > snr_db[1] or gain_db[0] > gain_db[1] or tilt_db < 0:
            raise ValueError(f"need 0 <= mix_prob <= 1, ordered snr_db / gain_db ranges and tilt_db >= 0, got "
                             f"{mix_prob!r}, {snr_db!r}, {gain_db!r}, {tilt_db!r}")  # fmt: skip
        self.mix_prob, self.snr_db, self.gain_db = float(mix_prob), tuple(snr_db), tuple(gain_db)
        self.tilt_db, self.floor = float(tilt_db), float(floor)

    def __call__(self, x: Tensor, partner: Tensor, generator: Randomness = None) -> Tensor:
        generator = self._generator(generator)
        batch, device = x.shape[0], x.device
        draw = _rand((batch, 4), generator, device)
        snr = self.snr_db[0] + (self.snr_db[1] - self.snr_db[0]) * draw[:, 0]
        snr = torch.where(draw[:, 1] < self.mix_prob, snr, torch.full_like(snr, math.inf))
        gain = self.gain_db[0] + (self.gain_db[1] - self.gain_db[0]) * draw[:, 2]
        tilt = self.tilt_db * (2 * draw[:, 3] - 1)
        return mix_log_mel(x, partner, snr, gain, tilt, self.floor)
