"""Dependency analysis and evaluation on tiny random checkpoints with a character tokenizer."""

import json

import pytest
import torch
import torch.nn.functional as F

from export.cli import main
from export.fusion.analyze import dependency_matrix
from export.fusion.calib import load_model
from export.fusion.evaluate import evaluate
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import FusionPlan
from export.synthetic import write_random_checkpoint
from tests.test_fusion_fuse import fusion_spec

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "How vexingly quick daft zebras jump; 0123456789 (sphinx of black quartz, judge my vow).\n") * 20


def char_tokenizer(path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("an")
    path = write_random_checkpoint(root / "m", fusion_spec(), seed=5, std=0.08)
    char_tokenizer(path)
    (root / "calib.txt").write_text(TEXT)
    return path


def naive_matrix(dec, ids):
    """The definition, run literally: the whole model from the embedding with block i removed."""
    m = dec.spec.num_layers
    active = [i for i in range(m) if not dec.spec.layers[i].is_empty]

    def contributions(skip):
        h, out = dec.embed(ids), {}
        for j in active:
            if j != skip:
                nxt = dec.block(j, h)
                out[j], h = nxt - h, nxt
        return out

    with torch.inference_mode():
        ref = contributions(None)
        M = {}
        for i in active:
            got = contributions(i)
            for j in (k for k in active if k > i):
                M[i, j] = (1 - F.cosine_similarity(ref[j].double(), got[j].double(), dim=-1)).mean().item()
    return M


def test_matrix_equals_the_definition(ckpt):
    _, dec = load_model(ckpt)
    ids = torch.randint(0, 99, (3, 12), generator=torch.Generator().manual_seed(0))
    dep = dependency_matrix(dec, ids, batch=2, progress=False)  # batches of 2 and 1 sequences
    want = naive_matrix(dec, ids)
    for (i, j), v in want.items():
        assert abs(dep.matrix[i][j] - v) <= 1e-9, (i, j)
    assert all(dep.matrix[2][j] is None and dep.matrix[j][2] is None for j in range(10))  # empty block 2
    assert dep.matrix[5][3] is None and dep.tokens == 36
    assert dep.block_calls == 2 * (10 + 9 * 8 // 2)  # per batch: one full pass + n(n-1)/2 over 9 blocks
    assert max(want.values()) > 1e-3  # random blocks do depend on each other


def test_analyze_cli_writes_matrix_plan_and_heatmap(ckpt, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = main(["analyze", str(ckpt), "--calib", str(ckpt.parent / "calib.txt"), "--tokens", "256",
                 "--seq-len", "64", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "M over 256 tokens" in text and "group [1, 4]: 3 FFNs [256, 768, 2048]" in text
    dep = json.loads((out / "dependency.json").read_text())
    assert "averaged over every calibration token" in dep["aggregation"] and dep["tokens"] == 256
    assert len(dep["matrix"]) == 10 and dep["block_stats"][1]["rel_norm"] > 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["groups"] == [[1, 4]] and plan["derived"][0]["max_dependency"] > 0
    png = (out / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_evaluate_against_itself_and_a_fused_candidate(ckpt, tmp_path):
    fused = fuse_checkpoint(ckpt, FusionPlan([(1, 4)]), tmp_path / "fused", progress=False).out
    (tmp_path / "held.txt").write_text(TEXT[::-1])
    base, same, cand = evaluate(ckpt, [ckpt, fused], tmp_path / "held.txt", tokens=256, seq_len=32,
                                progress=False)
    assert same.kl_vs_base <= 1e-9 and same.top1_agreement == 1.0 and same.perplexity == base.perplexity
    assert cand.kl_vs_base > 1e-4 and cand.top1_agreement < 1.0
    assert (base.non_empty_layers, cand.non_empty_layers) == (9, 7)
    assert base.sync_points_per_token - cand.sync_points_per_token == 2
    # perplexity and KL, recomputed here independently from the two models' logits
    from export.fusion.calib import token_batch
    from export.io.tokenizer import load_tokenizer

    ids = token_batch(tmp_path / "held.txt", load_tokenizer(ckpt, kind="tokenizers"), 99, 256, 32)
    with torch.inference_mode():
        lb, lc = load_model(ckpt)[1](ids), load_model(fused)[1](ids)
    ppl = F.cross_entropy(lc[:, :-1].transpose(1, 2), ids[:, 1:]).exp().item()
    kl = F.kl_div(F.log_softmax(lc, -1), F.log_softmax(lb, -1), log_target=True, reduction="sum").item() / ids.numel()
    assert cand.perplexity == pytest.approx(ppl, rel=1e-5)
    assert cand.kl_vs_base == pytest.approx(kl, rel=1e-4)


def test_text_and_tokenizer_errors(ckpt, tmp_path):
    from export.errors import ExportError

    with pytest.raises(ExportError, match="does not exist"):
        evaluate(ckpt, [ckpt], tmp_path / "none.txt", progress=False)
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(ExportError, match="need at least one sequence of 128"):
        evaluate(ckpt, [ckpt], tmp_path / "short.txt", progress=False)
    bare = write_random_checkpoint(tmp_path / "bare", fusion_spec(), seed=1)
    with pytest.raises(ExportError, match=r"no tokenizer\.json found"):
        evaluate(bare, [bare], tmp_path / "short.txt", progress=False)


def test_evaluate_checks_every_candidate_before_scoring(ckpt, tmp_path, monkeypatch):
    import export.fusion.evaluate as ev
    from export.errors import ExportError

    (tmp_path / "held.txt").write_text(TEXT[::-1])
    scored = []
    monkeypatch.setattr(ev, "_logits", lambda *a: scored.append(1) or [])
    with pytest.raises(ExportError, match="no-such-dir"):
        evaluate(ckpt, [ckpt, tmp_path / "no-such-dir"], tmp_path / "held.txt", tokens=256, seq_len=32,
                 progress=False)
    assert scored == []  # the base was never scored
