"""Subprocess: load a checkpoint in the megatron backend (world of 1, TP=1), export it with ``save_pretrained`` and
report the export's peak RSS above the RSS right before it, next to the largest LLM tensor's size.

Usage: python export_memory.py MODEL_DIR OUT_DIR OUT_JSON [MAX_SHARD_BYTES]
Peak RSS: the kernel's high-water mark (VmHWM), reset just before the export via /proc/self/clear_refs.
"""
from __future__ import annotations

import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402,F401  (offline env, 1 thread, warning filters)

import torch  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy, parallel

    model_dir, out_dir, out_json = sys.argv[1:4]
    kwargs = {"max_shard_bytes": int(sys.argv[4])} if len(sys.argv) > 4 else {}
    pol = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, trainable=False)
    largest = max(t.numel() * t.element_size() for t in pol.gpt.state_dict().values() if torch.is_tensor(t))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    before = _status_kb("VmRSS") * 1024
    pol.save_pretrained(out_dir, **kwargs)
    peak = _status_kb("VmHWM") * 1024
    result = {"rss_before": before, "peak": peak, "extra": peak - before, "largest_tensor_bytes": largest,
              "files": sorted(os.listdir(out_dir))}
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)
    parallel.destroy()


if __name__ == "__main__":
    main()
