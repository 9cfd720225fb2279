"""METEOR and BERTScore in a fresh process with every socket blocked, no proxies, HF_HUB_OFFLINE=1, an empty HF
cache and an empty nltk cache: they must work and must not even attempt a connection or an nltk download."""
import json
import os
import subprocess
import sys

import pytest

from nemo_grpo.rewards import bertscore, meteor

_SCRIPT = r"""
import json, socket, sys
attempts = []
def _blocked(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network blocked by test")
socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
import nltk
nltk.download = lambda *a, **k: attempts.append("nltk.download %r" % (a,))
hyps, refs, cache = json.loads(sys.stdin.read())
from nemo_grpo.rewards import bertscore, meteor
out = {"meteor": meteor(hyps, refs, cache_dir=cache), "bertscore": bertscore(hyps, refs, device="cpu"),
       "attempts": attempts}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.integration
def test_meteor_and_bertscore_offline_no_network(tmp_path, group_batch):
    hyps, refs = group_batch("en", group_size=3)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith(("HF_", "NLTK"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               NLTK_DATA=str(tmp_path / "no_nltk_data"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps([hyps, refs, str(tmp_path / "nltk")]),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    assert out["attempts"] == []
    assert out["meteor"] == meteor(hyps, refs, cache_dir=str(tmp_path / "nltk"))
    assert out["bertscore"] == pytest.approx(bertscore(hyps, refs, device="cpu"), abs=1e-6)
    assert max(out["meteor"]) > 0 and max(out["bertscore"]) > 0
