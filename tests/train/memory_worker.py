"""Measure, in a fresh process on CPU in fp32, the memory one GRPO training micro-batch adds on top of the loaded
policy: gradients of every trainable parameter + the micro-batch's activations + its logits buffers.

Run as ``python memory_worker.py SPECS_JSON`` (a list of specs, measured one after the other in this process, the
previous policy freed first); prints one JSON line per spec. Protocol: build the HF policy (train mode), encode
B=2 audio prompts, one warm-up forward/backward (lazy initialisations out of the way), drop its gradients, then
record the process's anonymous RSS (``RssAnon``: heap, excluding the mmapped checkpoint file) before and, sampled
every millisecond, during two more micro-batches' forward/backward (the second one runs with the first one's
gradients alive, as gradient accumulation does). ``MALLOC_MMAP_THRESHOLD_`` (set by the caller) makes glibc return
every large freed block to the OS, so RSS follows live tensor memory instead of the allocator's high-water mark.
"""
import gc
import json
import sys
import threading
import time

import torch


def rss_anon() -> int:
    """Bytes of this process's anonymous resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(spec: dict) -> dict:
    from nemo_grpo.policy.inputs import build_prompt_batch
    from nemo_grpo.train import runtime
    from nemo_grpo.train.config import ModelConfig

    torch.set_num_threads(1)
    cfg = ModelConfig(path=spec["model_dir"], precision="fp32", device="cpu",
                      activation_checkpointing=spec["checkpointing"])
    policy = runtime.build_policy(cfg, trainable=True, seed=0)
    policy.train()
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(32000, generator=g) * 0.1, torch.randn(24000, generator=g) * 0.1]
    batch = build_prompt_batch(policy.tokenizer, waves, ["<|audio|> what color is the box?", "translate <|audio|>"],
                               ["a", "b"], ["u1", "u2"], policy.config)
    ctx = policy.encode(batch)
    mb, t = spec["micro_batch"], spec["new_tokens"]
    vocab = policy.config.text_config.vocab_size
    ids = torch.randint(1, min(vocab, 500), (mb, t), generator=g)
    group = torch.arange(mb) % 2

    def micro_batch(rows=mb, cols=t):
        lp, _ = policy.score(ctx, ids[:rows, :cols], group[:rows], temperature=1.0, return_entropy=True)
        lp.sum().backward()

    micro_batch(2, 8)  # warm-up: lazy initialisations (thread pools, kernels' workspaces)
    for p in policy.trainable_parameters():
        p.grad = None
    gc.collect()
    time.sleep(0.05)
    base = rss_anon()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    micro_batch()
    micro_batch()
    stop.set()
    thread.join()
    peak[0] = max(peak[0], rss_anon())
    return {"measured_bytes": peak[0] - base, "prompt_tokens": int(ctx.batch.input_ids.shape[1]),
            "trainable_params": sum(p.numel() for p in policy.trainable_parameters()),
            "params": sum(p.numel() for p in policy.model.parameters())}


if __name__ == "__main__":
    for one in json.loads(sys.argv[1]):
        print(json.dumps(main(one)), flush=True)
        gc.collect()
