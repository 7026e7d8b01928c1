"""The demo (``python -m ptfast.demo``): smoke run end to end, data determinism, the masking rule, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ptfast.demo import data as D

ROOT = Path(__file__).resolve().parent.parent
SMALL_CORPUS = ("json", "textwrap", "csv", "shlex")


def _needs_demo_deps() -> None:
    for module in ("transformers", "tokenizers", "matplotlib", "tqdm", "sklearn"):
        pytest.importorskip(module)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PTFAST_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    _needs_demo_deps()
    out = tmp_path / "demo"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ptfast.demo", "--smoke", "--no-progress", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("report.md", "loss_curves.png", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert set(results["stages"]) == {"pretrain", "classify", "cnn", "vgg_attr", "resnet"}
    for key, stage in results["stages"].items():
        assert stage["parity_loss_diffs"], key
        assert stage["parity_max_abs_diff"] < 1e-4, (key, stage["parity_loss_diffs"])
        assert all(len(v) > 0 for v in stage["losses"].values()), key
        assert stage["dispatch"]["stock"] == [], key  # the stock twin never runs a ptfast op
    # The ptfast ops really ran in the patched twins (torch backend on CPU), forward and backward.
    assert {"attention", "masked_lm_loss", "conv_relu", "conv_relu_pool"} <= set(results["ops_ran"])
    ran = {(op, backend, kind) for s in results["stages"].values() for op, backend, kind, _ in s["dispatch"]["ptfast"]}
    for op in ("attention", "masked_lm_loss", "conv_relu_pool"):
        assert (op, "torch", "forward") in ran and (op, "torch", "backward") in ran, op
    # conv_relu: forward in the frozen ResNet (BatchNorm folded). A ConvReLU2d runs the replaced modules' own math
    # on a CPU under auto (ptfast.nn.conv._stock_math_on_cpu), so no conv_relu backward runs in the demo there.
    assert ("conv_relu", "torch", "forward") in ran
    report = (out / "report.md").read_text()
    assert "n/a on CPU" in report and "no performance claim" in report
    assert "parity ok" in proc.stdout
    _check_cnn_seed_stages(results["stages"], report)
    assert elapsed < 90, f"smoke run took {elapsed:.0f} s (budget 90 s on 2 cores)"


def _check_cnn_seed_stages(stages: dict, report: str) -> None:
    """The hand-written VGG and the ResNet stages: fused chains in the patch report, BatchNorm folded only where
    the backbone is in eval mode (frozen phase), stock BatchNorm math in train mode."""
    vgg = stages["vgg_attr"]
    assert [line.split(":")[0] for line in vgg["patch_report"]] == [f"conv{i}" for i in range(1, 6)]
    assert all("ConvReLUPool2d" in line for line in vgg["patch_report"]), vgg["patch_report"]
    ran = {(op, kind) for op, _, kind, _ in vgg["dispatch"]["ptfast"]}
    assert ("conv_relu_pool", "forward") in ran and ("conv_relu_pool", "backward") in ran

    resnet = stages["resnet"]
    lines = resnet["patch_report"]
    assert any(line.startswith("conv1: Conv2d+BatchNorm2d+ReLU -> ConvBNReLU2d") for line in lines), lines
    blocks = [line for line in lines if "(BasicBlock): fused block:" in line]
    assert len(blocks) == 4 and all("conv_relu(residual)" in line for line in blocks), lines
    assert sum("downsample.0: Conv2d+BatchNorm2d -> ConvBN2d" in line for line in lines) == 3, lines
    assert not any(line.startswith("kept:") for line in lines), lines
    assert resnet["checks"] == {"bn_folded_in_frozen_phase": True, "stock_bn_math_in_train_mode": True}
    phases = resnet["phase_dispatch"]
    for label in ("frozen backbone (parity)", "frozen backbone"):
        ops = {(op, kind) for op, _, kind, _ in phases[label]}
        assert ops == {("conv_relu", "forward")}, (label, phases[label])  # folded BN, no backward: frozen
    for label in ("pretrain 0-4 (parity)", "unfrozen (parity)", "pretrain 0-4", "unfrozen"):
        # train mode on a CPU: nothing to fold or pool, so the fused blocks run their stock forward (conv, BatchNorm
        # on batch statistics, add, ReLU) and the stem its stock conv + BatchNorm + ReLU: no ptfast op at all
        assert phases[label] == [], (label, phases[label])
    section = report.split("## 5. ResNet", 1)[1]
    assert "BatchNorm folded into the convolutions" in section and "uses_folded_bn() = True" in section
    assert "fused block: conv1+bn1+relu -> conv_relu" in section


def _vocab_digest(vocab: list[str]) -> str:
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()


def test_tokenizer_and_batches_are_deterministic() -> None:
    pytest.importorskip("tokenizers")
    docs, missing = D.collect_docs(SMALL_CORPUS)
    assert not missing and docs
    assert docs == D.collect_docs(SMALL_CORPUS)[0]
    texts = [d.text for d in docs]
    vocab = D.learn_wordpiece_vocab(texts, 400)
    assert vocab == D.learn_wordpiece_vocab(texts, 400)
    assert len(vocab) == 400 and list(vocab[: len(D.SPECIAL_TOKENS)]) == list(D.SPECIAL_TOKENS)
    assert len(set(vocab)) == len(vocab)
    # Across processes too (tokenizers' own WordPieceTrainer differs from one process to the next).
    code = (
        "import hashlib; from ptfast.demo import data as D; "
        f"v = D.learn_wordpiece_vocab([d.text for d in D.collect_docs({SMALL_CORPUS!r})[0]], 400); "
        "print(hashlib.sha256(chr(10).join(v).encode()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == _vocab_digest(vocab)

    tokenizer = D.build_tokenizer(vocab)
    paragraphs = [p for t in texts for p in D.paragraphs(t)]
    ids = D.encode(tokenizer, paragraphs)
    assert ids == D.encode(D.build_tokenizer(vocab), paragraphs)
    max_len = 64
    examples = D.pack_examples(ids, max_len, seed=3)
    assert examples == D.pack_examples(ids, max_len, seed=3)
    lengths = [len(e) for e in examples]
    assert min(lengths) >= max_len // 4 and max(lengths) <= max_len
    assert max(lengths) - min(lengths) > max_len // 3  # lengths spread over [L/4, L], not all the same
    assert all(e[0] == D.CLS_ID and e[-1] == D.SEP_ID for e in examples)

    def batches(seed: int) -> list[D.MLMBatch]:
        return D.mlm_batches(examples, batch_size=8, steps=6, vocab_size=len(vocab), seed=seed)

    a, b, c = batches(5), batches(5), batches(6)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.attention_mask, y.attention_mask)
        assert torch.equal(x.labels, y.labels)
    assert any(
        not torch.equal(x.labels, z.labels) or x.labels.shape != z.labels.shape for x, z in zip(a, c, strict=True)
    )
    assert D.classification_batches(50, 8, 10, seed=1) == D.classification_batches(50, 8, 10, seed=1)


def test_masking_rule() -> None:
    vocab_size = 1000
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(400):
        n = 20 + (i * 37) % 100
        body = torch.randint(len(D.SPECIAL_TOKENS), vocab_size, (n,), generator=gen).tolist()
        body[n // 2] = D.SEP_ID  # a special token inside the text is never masked either
        examples.append([D.CLS_ID, *body, D.SEP_ID])
    ids, attention_mask = D.pad_batch(examples)
    assert ids.shape[1] % 8 == 0 and (attention_mask == 0).any()
    masked, labels = D.mask_tokens(ids, attention_mask, vocab_size, torch.Generator().manual_seed(1))
    masked2, labels2 = D.mask_tokens(ids, attention_mask, vocab_size, torch.Generator().manual_seed(1))
    assert torch.equal(masked, masked2) and torch.equal(labels, labels2)

    selected = labels != D.IGNORE_INDEX
    special = (ids < len(D.SPECIAL_TOKENS)) | (attention_mask == 0)
    assert not (selected & special).any()  # never padding, [CLS], [SEP]
    assert torch.equal(labels[selected], ids[selected])  # the label is the original token
    assert (labels[~selected] == D.IGNORE_INDEX).all()
    assert torch.equal(masked[~selected], ids[~selected])  # unselected tokens are untouched
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01, rate

    n = selected.sum().item()
    to_mask = (masked == D.MASK_ID) & selected
    kept = (masked == ids) & selected
    replaced = selected & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n - 0.8) < 0.03
    # A random replacement may draw the original token (probability 1 / vocab): "kept" is 10% plus that.
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert abs(replaced.sum().item() / n - 0.1) < 0.02
    assert (masked[replaced] >= len(D.SPECIAL_TOKENS)).all() and (masked[replaced] < vocab_size).all()


def test_missing_dependencies_give_one_clear_message(monkeypatch, capsys) -> None:
    import ptfast.demo as demo

    monkeypatch.setattr(demo, "missing_requirements", lambda: ["scikit-learn", "tqdm"])
    assert demo.main(["--smoke"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ptfast[demo]'" in err and "scikit-learn" in err and "Traceback" not in err


def test_tour_still_runs(capsys) -> None:
    import ptfast.demo as demo

    assert demo.main(["--tour", "--device", "cpu", "--backend", "torch", "--steps", "2"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_stage_selection_and_step_overrides() -> None:
    from ptfast.demo import workflow as W

    assert W.resolve_stages(None) == list(W.STAGE_TITLES)
    assert W.resolve_stages(["classify"]) == ["pretrain", "classify"]  # classify fine-tunes pretrain's encoder
    assert W.resolve_stages(["resnet", "vgg_attr"]) == ["vgg_attr", "resnet"]
    steps = W.resolve_steps(W.build_parser().parse_args(["--smoke", "--cnn-steps", "5"]), "tiny")
    assert steps[:3] == W.SMOKE_STEPS[:3] and steps[3:] == (5,) * 7
    for size in W.SIZES.values():
        assert len(size["steps"]) == len(W.SMOKE_STEPS) == 10
