"""Granite Speech input features in pure torch (no torchaudio: its PyPI wheel cannot import on a CPU machine).

``GraniteSpeechFeatureExtractor`` (transformers 5.23) computes, for a zero-padded batch of 16 kHz waveforms [B, S]:

    mel     = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=512, win_length=400, hop_length=160,
                                                   n_mels=80)(audio)            # [B, 80, S // 160 + 1]
    logmel  = log10(clip(mel^T, min=1e-10))                                       # [B, frames, 80]
    logmel  = (max(logmel, amax_over_utterance(logmel) - 8)) / 4 + 1
    drop the last frame when the frame count is odd, then stack pairs of frames -> [B, F, 160], 50 Hz.

MelSpectrogram's unstated defaults (torchaudio 2.x), reproduced here:
  * ``torch.stft`` with a periodic Hann window of 400 samples zero-padded centrally to n_fft=512, ``center=True``,
    reflect padding, not normalised, one-sided; power spectrum = ``|X|.pow(2.0)``;
  * mel filter bank ``melscale_fbanks(n_freqs=257, f_min=0, f_max=8000, n_mels=80, sample_rate=16000,
    norm=None, mel_scale="htk")``: HTK mel scale, triangles between ``n_mels + 2`` mel-spaced points evaluated on
    ``linspace(0, 8000, 257)``, computed in float32 like torchaudio does;
  * ``mel = spec^T @ fb``.
The max used for the ``-8`` floor is taken over the whole padded row, padding frames included (exactly what the
extractor does; padding frames are ~1e-10 so they never raise the max).

``tests/policy/test_features.py`` checks this against an independent float64 NumPy implementation built from
``transformers.audio_utils`` (``window_function``/``spectrogram``/``mel_filter_bank``) with the same parameters.

Shape legend: B utterances, S audio samples (16 kHz), F stacked feature frames (50 Hz), A projected audio tokens.
"""
from __future__ import annotations

import math
from typing import Any

import torch

SAMPLE_RATE = 16000
N_FFT = 512
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 80
FEATURE_DIM = 2 * N_MELS  # two 10 ms frames stacked -> 160


def _hz_to_mel_htk(freq: float) -> float:
    return 2595.0 * math.log10(1.0 + freq / 700.0)


def mel_filter_bank(
    n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE, dtype=torch.float32
) -> torch.Tensor:
    """torchaudio's ``melscale_fbanks`` (htk, no norm, f_min 0, f_max sr/2): [n_freqs, n_mels]."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=dtype)
    m_pts = torch.linspace(_hz_to_mel_htk(0.0), _hz_to_mel_htk(sample_rate / 2), n_mels + 2, dtype=dtype)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]  # [n_mels + 1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.min(down, up), min=0.0)


_FB_CACHE: dict[tuple, torch.Tensor] = {}


def _cached_fb(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _FB_CACHE:
        # torchaudio builds the bank in float32 and casts with the module; do the same for bit-level agreement.
        _FB_CACHE[key] = mel_filter_bank().to(device=device, dtype=dtype)
    return _FB_CACHE[key]


def mel_spectrogram(waveforms: torch.Tensor) -> torch.Tensor:
    """Power mel spectrogram as torchaudio's MelSpectrogram defaults compute it: [B, S] -> [B, 80, S // 160 + 1]."""
    window = torch.hann_window(WIN_LENGTH, periodic=True, dtype=waveforms.dtype, device=waveforms.device)
    spec = torch.stft(
        waveforms,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    ).abs().pow(2.0)  # [B, 257, frames]
    fb = _cached_fb(waveforms.device, waveforms.dtype)
    return torch.matmul(spec.transpose(-1, -2), fb).transpose(-1, -2)


def feature_lengths_for(num_samples: torch.Tensor) -> torch.Tensor:
    """Real stacked frames per utterance: (S // 160 + 1) // 2 (the odd trailing mel frame is dropped)."""
    return torch.div(torch.div(num_samples, HOP_LENGTH, rounding_mode="floor") + 1, 2, rounding_mode="floor")


@torch.no_grad()
def log_mel_features(
    waveforms: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GraniteSpeechFeatureExtractor's features for a zero-padded batch.

    waveforms: [B, S] float, 16 kHz, zero-padded after each utterance's ``lengths[b]`` samples.
    lengths:   [B] long real sample counts (None: every row is S long). Samples past a length are zeroed first so
               the result equals the extractor's on the same list of unpadded waveforms.
    Returns (features [B, F, 160] float32, feature_lengths [B] long) with F = (S // 160 + 1) // 2.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be [B, S], got shape {tuple(waveforms.shape)}")
    bsz, num_samples = waveforms.shape
    audio = waveforms.float()
    if lengths is None:
        lengths = torch.full((bsz,), num_samples, dtype=torch.long)
    else:
        lengths = lengths.to(torch.long).cpu()
        if int(lengths.max()) > num_samples or int(lengths.min()) < 1:
            raise ValueError(f"lengths must lie in [1, {num_samples}], got {lengths.tolist()}")
        keep = torch.arange(num_samples).unsqueeze(0) < lengths.unsqueeze(1)  # [B, S]
        audio = torch.where(keep.to(audio.device), audio, torch.zeros((), dtype=audio.dtype, device=audio.device))
    mel = mel_spectrogram(audio)  # [B, 80, frames]
    logmel = mel.transpose(-1, -2).clamp(min=1e-10).log10()  # [B, frames, 80]
    mx = logmel.amax(dim=(-2, -1), keepdim=True)
    logmel = torch.maximum(logmel, mx - 8.0).div(4).add(1)
    if logmel.shape[1] % 2 == 1:
        logmel = logmel[:, :-1]
    features = logmel.reshape(bsz, -1, FEATURE_DIM)  # [B, F, 160]
    return features, feature_lengths_for(lengths)


def num_audio_tokens(num_samples: int, config: Any) -> int:
    """Projected audio tokens A for one utterance of ``num_samples`` 16 kHz samples.

    Exactly ``GraniteSpeechFeatureExtractor._get_num_audio_features``: encoder frames = (S // 160 + 1) // 2; the
    projector windows them into blocks of ``window_size`` (15) frames, each yielding
    ``window_size // downsample_rate`` (3) query tokens: A = ceil(frames / 15) * 3.
    ``config``: a GraniteSpeechConfig (or anything with ``window_size`` and ``downsample_rate``).
    """
    window, rate = int(config.window_size), int(config.downsample_rate)
    encoder_frames = (int(num_samples) // HOP_LENGTH + 1) // 2
    return math.ceil(encoder_frames / window) * (window // rate)
