"""Corpus metrics vs the libraries, outputs JSONL validation, paper-style tables, and `nemo-grpo evaluate`."""
import json
import os

import pytest
import sacrebleu
from nltk.tokenize import word_tokenize
from rouge_score import rouge_scorer

from nemo_grpo.evaluation import (
    corpus_metrics,
    evaluate_outputs,
    load_outputs,
    markdown_table,
    table_rows,
    write_outputs,
)
from nemo_grpo.rewards import rouge_tokenizer

REFS = ["Die Straße ist schön und sehr groß.", "Er sagte, dass die Besprechung um 10:30 Uhr beginnen würde.",
        "Größere Mädchen laufen schneller über die Wiese.", "Über den Fluß führt eine alte Brücke."]
HYPS = ["Die Straße ist schön und groß.", "Er sagte, die Besprechung beginnt um 10:30 Uhr.", "   ",
        "Eine alte Brücke führt über den Fluß."]


@pytest.fixture(scope="module")
def nltk_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nltk"))


def test_corpus_metrics_equal_library_values(nltk_cache):
    from nltk.translate.meteor_score import meteor_score

    m = corpus_metrics(HYPS, REFS, lang="de", bertscore_model="none", meteor_cache_dir=nltk_cache)
    lib_bleu = sacrebleu.BLEU()
    assert m["BLEU"] == lib_bleu.corpus_score(HYPS, [REFS]).score
    assert m["bleu_signature"] == str(lib_bleu.get_signature()) and "tok:13a" in m["bleu_signature"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=rouge_tokenizer(False, None, "de"))
    scores = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    for col, key in (("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL")):
        assert m[col] == pytest.approx(100 * sum(s[key].fmeasure for s in scores) / len(REFS), abs=1e-12)
    tok = lambda s: word_tokenize(s, preserve_line=True)  # noqa: E731
    lib_meteor = [meteor_score([tok(r)], tok(h)) for h, r in zip(HYPS, REFS)]
    assert m["METEOR"] == pytest.approx(100 * sum(lib_meteor) / len(REFS), abs=1e-12)
    assert m["BERTScore"] is None and m["n"] == 4
    assert m["settings"]["rouge_tokenizer"] == "unicode" and m["settings"]["rouge_use_stemmer"] is False


def test_corpus_bertscore_is_mean_f1_x100(nltk_cache):
    from nemo_grpo.rewards import minilm_model_path
    from nemo_grpo.rewards.neural import get_scorer

    m = corpus_metrics(HYPS[:2], REFS[:2], bertscore_model=minilm_model_path(), meteor_cache_dir=nltk_cache,
                       device="cpu")
    _, _, f1 = get_scorer(minilm_model_path(), 6, "cpu").score(HYPS[:2], REFS[:2])
    assert m["BERTScore"] == pytest.approx(100 * f1.mean().item(), abs=1e-4)
    assert m["settings"]["bertscore_model"] == minilm_model_path()


def test_table_avg_reproduces_paper_table3_row():
    paper = {"BLEU": 44.9, "BERTScore": 94.45, "ROUGE-1": 68.56, "ROUGE-2": 53.35, "ROUGE-L": 64.88, "METEOR": 68.48}
    rows = table_rows({"BLEU": paper}, avg=True)
    assert round(rows[0]["AVG"], 2) == 65.77  # the paper's AVG for its BLEU-reward row
    md = markdown_table({"Granite Speech 2B": paper, "+ GRPO": {**paper, "BERTScore": None}}, avg=True,
                        row_header="Reward", footnotes=False)
    lines = md.strip().splitlines()
    assert lines[0] == ("| Reward | BLEU (↑) | BERTScore (↑) | ROUGE-1 (↑) | ROUGE-2 (↑) | ROUGE-L (↑) "
                        "| METEOR (↑) | AVG (↑) |")
    assert lines[2] == "| Granite Speech 2B | 44.90 | 94.45 | 68.56 | 53.35 | 64.88 | 68.48 | 65.77 |"
    assert lines[3] == "| + GRPO | 44.90 | - | 68.56 | 53.35 | 64.88 | 68.48 | - |"


def _write(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


@pytest.mark.parametrize("line,match", [
    ('{"id": "1", "hypothesis": "a"}', "x.jsonl:2: missing key 'reference'"),
    ('{"id": 1, "hypothesis": "a", "reference": "b"}', "x.jsonl:2: key 'id' must be a string"),
    ('{"id": "0", "hypothesis": "a", "reference": "b"}', "x.jsonl:2: duplicate id '0'"),
    ('not json', "x.jsonl:2: invalid JSON"),
])
def test_load_outputs_errors_name_file_line_and_key(tmp_path, line, match):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "0", "hypothesis": "a", "reference": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        load_outputs(p)


def test_outputs_roundtrip_keeps_extra_keys_and_unicode(tmp_path):
    recs = [{"id": str(i), "hypothesis": h, "reference": r, "step": 3} for i, (h, r) in enumerate(zip(HYPS, REFS))]
    write_outputs(tmp_path / "o.jsonl", recs)
    assert load_outputs(tmp_path / "o.jsonl") == recs
    assert "Straße" in (tmp_path / "o.jsonl").read_text(encoding="utf-8")


def test_evaluate_outputs_several_systems(nltk_cache):
    base = [{"id": str(i), "hypothesis": h, "reference": r} for i, (h, r) in enumerate(zip(HYPS, REFS))]
    perfect = [{**rec, "hypothesis": rec["reference"]} for rec in base]
    res = evaluate_outputs({"Granite Speech 2B": base, "+ GRPO": perfect}, avg=True, lang="de",
                           bertscore_model="none", meteor_cache_dir=nltk_cache)
    assert [r["system"] for r in res["rows"]] == ["Granite Speech 2B", "+ GRPO"]
    top = res["systems"]["+ GRPO"]
    assert top["BLEU"] == pytest.approx(100.0) and top["ROUGE-L"] == pytest.approx(100.0)
    assert res["systems"]["Granite Speech 2B"]["BLEU"] < top["BLEU"]
    assert "| + GRPO | 100.00 |" in res["table_md"]


def test_cli_evaluate_writes_json_and_markdown(tmp_path, capsys, monkeypatch, nltk_cache):
    from nemo_grpo.cli import main

    monkeypatch.setenv("NEMO_GRPO_NLTK_DATA", nltk_cache)
    recs = [{"id": str(i), "hypothesis": h, "reference": r} for i, (h, r) in enumerate(zip(HYPS, REFS))]
    a = _write(tmp_path / "base.jsonl", recs)
    b = _write(tmp_path / "grpo.jsonl", [{**r, "hypothesis": r["reference"]} for r in recs])
    out = tmp_path / "eval"
    rc = main(["evaluate", "--outputs", f"Granite Speech 2B={a}", f"+ GRPO={b}", "--out", str(out), "--lang", "de",
               "--bertscore-model", "minilm", "--avg"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics["systems"]) == ["Granite Speech 2B", "+ GRPO"] and metrics["avg"] is True
    assert metrics["systems"]["+ GRPO"]["BERTScore"] == pytest.approx(100.0, abs=1e-3)
    table = (out / "table.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out and "AVG (↑)" in table and "signature `nrefs:1|" in table
    with pytest.raises(ValueError, match="NAME=PATH"):
        main(["evaluate", "--outputs", str(a), "--out", str(out)])


@pytest.mark.integration
def test_cli_evaluate_decodes_checkpoints_on_a_recipe_test_split(tmp_path, capsys, tiny_model_dir, toy_manifests):
    """`evaluate --config RECIPE --model NAME=DIR`: the checkpoint is decoded on the recipe's test split (the real
    toy corpus through the lhotse loader) with the recipe's evaluation decoding, written as outputs JSONL, and
    scored in the same table as an outputs file; the BLEU equals sacrebleu's on the written outputs."""
    import sacrebleu

    from nemo_grpo.cli import main

    out = tmp_path / "eval"
    cfg = ["--config", "conf/tiny_grpo.yaml", f"data.manifest_dir={toy_manifests}", "eval.max_new_tokens=6",
           "model.device=cpu"]
    rc = main(["evaluate", *cfg, "--model", f"Tiny base={tiny_model_dir}", "--out", str(out),
               "--bertscore-model", "none"])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "Tiny_base.jsonl").read_text(encoding="utf-8").splitlines()]
    test_ids = {json.loads(line)["id"] for name in os.listdir(toy_manifests) if "test" in name and "cuts" in name
                for line in _lines(os.path.join(toy_manifests, name))}
    assert recs and {r["id"] for r in recs} <= test_ids and len({r["id"] for r in recs}) == len(recs)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    bleu = sacrebleu.corpus_bleu([r["hypothesis"] for r in recs], [[r["reference"] for r in recs]])
    assert metrics["systems"]["Tiny base"]["BLEU"] == pytest.approx(bleu.score, abs=1e-9)
    assert metrics["inputs"]["Tiny base"] == {"model": tiny_model_dir, "split": "test"}
    # a checkpoint row and an outputs row side by side
    perfect = _write(tmp_path / "perfect.jsonl", [{**r, "hypothesis": r["reference"]} for r in recs])
    rc = main(["evaluate", *cfg, "--model", f"Tiny base={tiny_model_dir}", "--outputs", f"Oracle={perfect}",
               "--out", str(tmp_path / "eval2"), "--bertscore-model", "none"])
    table = json.loads((tmp_path / "eval2" / "metrics.json").read_text(encoding="utf-8"))
    assert list(table["systems"]) == ["Tiny base", "Oracle"]
    assert table["systems"]["Oracle"]["BLEU"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="--model needs --config"):
        main(["evaluate", "--model", f"x={tiny_model_dir}", "--out", str(out)])
    with pytest.raises(ValueError, match="not a HF checkpoint dir"):
        main(["evaluate", *cfg, "--model", f"x={tmp_path}", "--out", str(out)])
    with pytest.raises(ValueError, match="would both write"):
        main(["evaluate", *cfg, "--model", f"+ A={tiny_model_dir}", f"+A={tiny_model_dir}", "--out", str(out)])
    with pytest.raises(ValueError, match="would overwrite the --outputs input"):
        main(["evaluate", *cfg, "--model", f"Oracle 2={tiny_model_dir}", "--outputs", f"x={out / 'Oracle_2.jsonl'}",
              "--out", str(out)])


def _lines(path):
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]
