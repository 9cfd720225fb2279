"""`nemo-grpo sample` end to end on a real (espeak-ng or synthetic) audio file, and the resampler."""
import shutil
import subprocess

import numpy as np
import soundfile as sf
import torch

from nemo_grpo.cli import main
from nemo_grpo.policy.sample_cmd import load_audio


def test_load_audio_resamples_to_16k(tmp_path):
    t = np.arange(22050) / 22050
    sf.write(tmp_path / "a.flac", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.5, 22050)
    wave = load_audio(str(tmp_path / "a.flac"))
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    assert abs(int(spectrum.argmax()) - 440) <= 1  # 1 s at 16 kHz: bin index = Hz; the tone survives


def test_sample_cli(tiny_model_dir, tmp_path, capsys):
    wav = tmp_path / "speech.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(wav), "the red box is on the left"], check=True)
    else:
        sf.write(wav, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    rc = main(["sample", "--model", tiny_model_dir, "--audio", str(wav), "--prompt", "<|audio|> where is the box?",
               "-n", "3", "--max-new-tokens", "5", "--temperature", "0.9", "--top-p", "0.9"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert rc == 0 and len(lines) == 3 and all("logp=" in line for line in lines)
