"""Batches through NeMo's lhotse dataloader (from the shipped YAML) and the sequential evaluation loader."""
import glob
import os

import pytest
import soundfile as sf
import torch
from lhotse import CutSet
from omegaconf import OmegaConf

from nemo_grpo.data.dataset import build_dataloader, validate_data_config
from nemo_grpo.data.prompts import AUDIO, PromptTemplates
from nemo_grpo.policy.base import PromptBatch
from nemo_grpo.policy.features import log_mel_features, num_audio_tokens

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_PROMPTS = ("Listen to the audio <|audio|> and answer the following question:<|question|>",
                 "<|audio|> listen to the speech and translate it into German.")


def _toy_cfg(manifest_dir):
    cfg = OmegaConf.load(os.path.join(REPO, "conf", "data", "toy.yaml"))
    cfg.manifest_dir = manifest_dir
    return cfg


def _cuts(manifest_dir, names):
    out = {}
    for name in names:
        out.update({c.id: c for c in CutSet.from_file(os.path.join(manifest_dir, name))})
    return out


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "conf", "data", "*.yaml"))))
def test_shipped_yaml_validates(path):
    cfg = validate_data_config(OmegaConf.load(path))
    assert {"train", "valid", "test"} <= set(cfg) and cfg["max_prompt_tokens"] == 256


def test_config_errors_name_the_key(toy_manifests, tiny_tokenizer_config):
    tok, config = tiny_tokenizer_config
    cfg = _toy_cfg(toy_manifests)
    with pytest.raises(ValueError, match="max_prompt_tokenz"):
        validate_data_config(OmegaConf.merge(cfg, {"max_prompt_tokenz": 3}))
    with pytest.raises(ValueError, match="batch_sise"):
        build_dataloader(OmegaConf.merge(cfg, {"train": {"batch_sise": 3}}), tok, config, split="train", seed=0)
    with pytest.raises(ValueError, match=r"data\.valid\.input_cfg\[0\]\.cuts_path"):
        build_dataloader(OmegaConf.merge(cfg, {"valid": {"input_cfg": [{"cuts_path": "nope.jsonl.gz"}]}}),
                         tok, config, split="valid", seed=0)


def _check_batch(batch, cuts, config, tok):
    """PromptBatch invariants against the manifests and an independent per-utterance feature computation."""
    assert isinstance(batch, PromptBatch)
    b, p = batch.input_ids.shape
    assert batch.attention_mask.shape == (b, p) and batch.input_features.shape[::2] == (b, 160)
    audio_id = tok.convert_tokens_to_ids(AUDIO)
    for row, cut_id in enumerate(batch.ids):
        cut = cuts[cut_id]
        custom = cut.supervisions[0].custom
        ref = custom["answer"] if custom["task"] == "sqa" else custom["translation"]
        assert batch.references[row] == ref
        if custom["task"] == "sqa":
            assert custom["question"] in batch.prompts[row]
        wave = torch.from_numpy(cut.load_audio()[0])
        n_audio = num_audio_tokens(wave.numel(), config)
        assert int((batch.input_ids[row] == audio_id).sum()) == n_audio == int(batch.input_features_mask[row].sum())
        # the row's features are its own audio's (the last frame's STFT window reaches into the batch padding,
        # exactly as in GraniteSpeechFeatureExtractor on a padded batch, so it is left out)
        single, f_len = log_mel_features(wave[None])
        n = int(f_len) - 1
        assert torch.allclose(batch.input_features[row, :n], single[0, :n], atol=1e-5)
        assert not batch.attention_mask[row, : p - int(batch.attention_mask[row].sum())].any()  # left padding


def test_nemo_bucketing_loader_from_yaml(toy_manifests, tiny_tokenizer_config):
    from lhotse.dataset import DynamicBucketingSampler

    tok, config = tiny_tokenizer_config
    cuts = _cuts(toy_manifests, ["librisqa_cuts_train.jsonl.gz", "covost2_cuts_train.jsonl.gz"])
    loader = build_dataloader(_toy_cfg(toy_manifests), tok, config, split="train", seed=0)
    assert isinstance(loader.loader.sampler, DynamicBucketingSampler)
    batches = list(loader)
    ids = [i for b in batches for i in b.ids]
    assert sorted(ids) == sorted(cuts) and len(ids) == 43  # force_finite: every train cut exactly once
    assert all(len(b) <= 8 for b in batches) and loader.skips.total == 0
    tasks = [{cuts[i].supervisions[0].custom["task"] for i in b.ids} for b in batches]
    assert {"sqa", "ast"} <= set().union(*tasks)
    for batch in batches[:3]:
        _check_batch(batch, cuts, config, tok)
    again = [i for b in build_dataloader(_toy_cfg(toy_manifests), tok, config, split="train", seed=0) for i in b.ids]
    other = [i for b in build_dataloader(_toy_cfg(toy_manifests), tok, config, split="train", seed=1) for i in b.ids]
    assert again == ids and other != ids


def test_nemo_loader_shards_over_dp_ranks(toy_manifests, tiny_tokenizer_config):
    tok, config = tiny_tokenizer_config
    shards = [[i for b in build_dataloader(_toy_cfg(toy_manifests), tok, config, split="train", seed=0,
                                           dp_rank=r, dp_world_size=2) for i in b.ids] for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 43


def test_sequential_eval_loader(toy_manifests, tiny_tokenizer_config):
    tok, config = tiny_tokenizer_config
    names = ["librisqa_cuts_valid.jsonl.gz", "covost2_cuts_dev.jsonl.gz"]
    cuts = _cuts(toy_manifests, names)
    order = list(cuts)  # file order, inputs in listed order
    loader = build_dataloader(_toy_cfg(toy_manifests), tok, config, split="valid", seed=0)
    batches = list(loader)
    n = len(order)
    assert [i for b in batches for i in b.ids] == order
    assert [len(b) for b in batches] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    _check_batch(batches[-1], cuts, config, tok)
    # the audio reaching the features is the file's own audio (soundfile as the independent decoder)
    first = cuts[order[0]]
    ref, _ = sf.read(first.recording.sources[0].source, dtype="float32")
    single, f_len = log_mel_features(torch.from_numpy(ref)[None])
    n = int(f_len) - 1
    assert torch.allclose(batches[0].input_features[0, :n], single[0, :n], atol=1e-5)
    shards = [[i for b in build_dataloader(_toy_cfg(toy_manifests), tok, config, split="valid", seed=0,
                                           dp_rank=r, dp_world_size=2) for i in b.ids] for r in (0, 1)]
    assert shards[0] == order[0::2] and shards[1] == order[1::2]


def test_prompt_templates():
    t = PromptTemplates.load(seed=0)
    for prompt in PAPER_PROMPTS:
        assert prompt in t.templates["sqa"] + t.templates["ast"]
    keys = [f"utt-{i}" for i in range(200)]
    chosen = [t.choose("sqa", k) for k in keys]
    assert chosen == [PromptTemplates.load(seed=0).choose("sqa", k) for k in keys]  # stable across loads
    assert set(chosen) == set(t.templates["sqa"])  # every template gets used
    assert chosen != [PromptTemplates.load(seed=1).choose("sqa", k) for k in keys]
    msg = t.render("sqa", "x", "where is the red box?")
    assert msg.count(AUDIO) == 1 and "where is the red box?" in msg and "<|question|>" not in msg


def test_prompt_yaml_errors_name_the_entry(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text('sqa:\n  - "no audio here <|question|>"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"sqa\[0\]"):
        PromptTemplates.load(str(bad))
    bad.write_text('asr:\n  - "<|audio|>"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="asr"):
        PromptTemplates.load(str(bad))
