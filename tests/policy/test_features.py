"""Pure-torch Granite Speech log-mel vs an independent float64 NumPy reference (transformers.audio_utils)."""
import math

import numpy as np
import pytest
import torch
from transformers import GraniteSpeechConfig
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from nemo_grpo.policy.features import log_mel_features, num_audio_tokens


def _reference(waves: list[np.ndarray]) -> np.ndarray:
    """The extractor's recipe, re-derived in float64 NumPy from audio_utils: zero-pad the batch, power spectrum
    (periodic Hann 400 centred in 512, reflect-centred frames), HTK mel bank without norm, log10 floor 1e-10,
    per-row max-8 clamp, /4+1, drop odd frame, stack pairs."""
    s_max = max(len(w) for w in waves)
    fb = mel_filter_bank(257, 80, 0.0, 8000.0, 16000, norm=None, mel_scale="htk")  # [257, 80]
    win = window_function(400, "hann", periodic=True, frame_length=512, center=True)
    rows = []
    for w in waves:
        padded = np.zeros(s_max, dtype=np.float64)
        padded[: len(w)] = w
        logmel = spectrogram(padded, win, frame_length=512, hop_length=160, fft_length=512, power=2.0,
                             center=True, pad_mode="reflect", mel_filters=fb, mel_floor=1e-10, log_mel="log10",
                             dtype=np.float64).T  # [frames, 80]
        logmel = np.maximum(logmel, logmel.max() - 8.0) / 4 + 1
        if logmel.shape[0] % 2 == 1:
            logmel = logmel[:-1]
        rows.append(logmel.reshape(-1, 160))
    return np.stack(rows)


def test_log_mel_matches_float64_reference():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    waves = [
        (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(16000)),  # 1 s tone + noise
        0.1 * rng.standard_normal(9_123),  # odd length, shorter: zero padding inside the batch
        0.5 * rng.standard_normal(12_960),
    ]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(3, 16000)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w).float()
    feats, flen = log_mel_features(batch, lengths)
    ref = _reference([w.astype(np.float32).astype(np.float64) for w in waves])
    assert feats.shape == ref.shape == (3, 50, 160)
    err = np.abs(feats.double().numpy() - ref).max()
    assert err < 2e-5, err  # measured 3.4e-6 max, 2e-7 mean (float32 STFT vs float64)
    assert np.abs(feats.double().numpy() - ref).mean() < 1e-6
    assert flen.tolist() == [(n // 160 + 1) // 2 for n in lengths.tolist()]


def test_padding_is_zeroed_past_lengths():
    x = torch.randn(2, 8000)
    garbage = x.clone()
    garbage[0, 5000:] = 7.0  # must be ignored
    a, _ = log_mel_features(x * (torch.arange(8000) < torch.tensor([[5000], [8000]])), torch.tensor([5000, 8000]))
    b, _ = log_mel_features(garbage, torch.tensor([5000, 8000]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [257, 319, 320, 4799, 4800, 4960, 16000, 16001, 48000, 12345])
def test_num_audio_tokens_matches_processor_formula(n):
    cfg = GraniteSpeechConfig()
    # The processor's loop, written independently of ours: mel frames, encoder frames, blocks of 15, 3 per block.
    mel = n // 160 + 1
    enc = mel // 2
    expected = math.ceil(enc / 15) * (15 // 5)
    assert num_audio_tokens(n, cfg) == expected
    # and it equals the projector's output length on the feature frames our extractor yields
    feats, _ = log_mel_features(torch.zeros(1, n) + 1e-3)
    assert math.ceil(feats.shape[1] / cfg.window_size) * (cfg.window_size // cfg.downsample_rate) == expected
