"""Convergence check: a small BERT trained with masked-LM, stock Hugging Face vs ``ptfast.patch(unpad=True)``.

    python -m benchmarks.convergence --device cuda --steps 3000 --out benchmarks/results/<device>/convergence
    python -m benchmarks.convergence --quick --device cpu --out /tmp/conv          # CPU smoke run (< 1 min)

Text: real, offline English — the docstrings of the Python standard library's modules, classes and functions
(read with ``ast`` from the interpreter's own ``Lib/``, nothing is imported or downloaded; ``test``/``idlelib``/
``site-packages`` and similar directories left out) plus the language-reference topics of ``pydoc_data.topics``.
A deterministic WordPiece-style tokenizer defined here (lower-cased words, digits and punctuation; the most
frequent words as whole-word entries, unknown words spelled as ``first-letter ##letter ...``) turns each text into
chunks of at most ``seq_len - 2`` tokens, ``[CLS] ... [SEP]``, right-padded; every 20th chunk is held out.

Runs (same initial weights, same batches, same masks; they differ in the implementation and the dropout seed):
``stock`` (``BertForMaskedLM``, ``attn_implementation="sdpa"``, dropout seed 1), ``ptfast`` (the same model after
``ptfast.patch(model, unpad=True)``, dropout seed 1; its dropout masks come from ptfast's own generator, so they
differ from stock's anyway), ``stock-seed2`` and ``ptfast-seed2`` (dropout seed 2): the run-to-run noise of each
implementation (a CPU quick run showed one stock pair underestimating ptfast's own seed spread; per-step loss and
gradient distributions over 300 dropout seeds match between the two). Training: bf16 autocast on CUDA (fp32 on
CPU), AdamW (fused on CUDA), linear warm-up and decay,
gradient clipping at 1.0, dropout 0.1, 15% of real tokens selected per batch (80% [MASK], 10% random, 10% kept).
Both implementations run eagerly (no torch.compile).

Agreement: trailing moving averages (``--smooth`` steps) of the per-step training losses. The *gap* is the
largest (and the mean) absolute difference between the smoothed curves of a stock and a ptfast run with the same
seed; the *noise* is the same measure between two runs of one implementation with different dropout seeds. The
summary says "within run-to-run noise" when both the max and the mean gap are at most ``--tolerance`` (default 2)
times the noise: with one noise pair the noise estimate is itself noisy (two exchangeable differences each exceed
the other half of the time), hence the factor. The held-out loss (dropout off, fixed masks) is compared the same
way. Outputs in ``--out``: ``convergence.json`` (everything), ``curves.csv`` (per-step losses and gradient norms),
``eval.csv``, ``convergence.png`` and ``convergence.md`` (the summary). Finished runs are kept in ``runs/`` and
reused by a later call with the same configuration, versions and sources (ptfast's and this script's; ``--fresh``
recomputes), so the runs can be split over several commands (``--runs stock ptfast``, then ``--runs
stock-seed2``); the summary covers the runs present.
"""

from __future__ import annotations

import argparse
import ast
import collections
import copy
import csv
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import env

ROOT = Path(__file__).resolve().parent.parent
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: name -> (patched with ptfast.patch(unpad=True), dropout seed)
RUNS: dict[str, tuple[bool, int]] = {
    "stock": (False, 1),
    "ptfast": (True, 1),
    "stock-seed2": (False, 2),
    "ptfast-seed2": (True, 2),
}
DEFAULT_RUNS = ("stock", "ptfast", "stock-seed2", "ptfast-seed2")  # noise from both implementations
EXCLUDED_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo", "lib2to3",
    "ensurepip", "__phello__",
}  # fmt: skip


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 3000
    batch: int = 64
    seq_len: int = 128
    vocab: int = 8192
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024
    dropout: float = 0.1
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.01
    clip: float = 1.0
    mask_prob: float = 0.15
    eval_every: int = 100
    eval_batches: int = 16
    smooth: int = 100
    tolerance: float = 2.0
    init_seed: int = 0
    data_seed: int = 1234
    max_files: int | None = None  # stdlib files read (None: all)
    quick: bool = False
    device: str = "cuda"
    dtype: str = "bf16"


def quick_config(device: str, steps: int | None) -> Config:
    n = steps or 60
    return Config(
        steps=n, batch=16, seq_len=64, vocab=1024, hidden=64, layers=2, heads=2, intermediate=128, lr=1e-3,
        warmup=max(1, n // 10), eval_every=max(1, n // 3), eval_batches=2, smooth=max(2, n // 6), max_files=40,
        quick=True, device=device,
    )  # fmt: skip


# --- corpus and tokenizer -------------------------------------------------------------------------------------


def stdlib_texts(max_files: int | None) -> tuple[list[str], dict[str, Any]]:
    """Docstrings of the standard library (module, class, function; source order per file, files sorted by path)
    and the pydoc topics, read with ``ast`` (nothing is imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDED_DIRS and not x.startswith("config-"))
        files += [Path(d) / f for f in names if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_files is not None:
        files = files[:max_files]
    texts: list[str] = []
    n_doc = n_topic = 0
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    texts.append(doc)
                    n_doc += 1
        if f.relative_to(root).as_posix() == "pydoc_data/topics.py":
            for node in tree.body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                    for v in node.value.values:
                        if isinstance(v, ast.Constant) and isinstance(v.value, str):
                            texts.append(v.value)
                            n_topic += 1
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    meta = dict(
        stdlib=str(root),
        python=platform.python_version(),
        files=len(files),
        docstrings=n_doc,
        pydoc_topics=n_topic,
        characters=sum(len(t) for t in texts),
        sha256=digest,
    )
    return texts, meta


_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


def _is_word(piece: str) -> bool:
    return "a" <= piece[0] <= "z"


class Tokenizer:
    """Deterministic WordPiece-style tokenizer: whole words for the most frequent words, letters (first and
    ``##`` continuation) for the rest, single digits and punctuation marks; ties in frequency broken by spelling."""

    def __init__(self, texts: list[str], vocab_size: int) -> None:
        words: collections.Counter[str] = collections.Counter()
        for t in texts:
            words.update(_WORDS.findall(t.lower()))
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        symbols = sorted(w for w, n in words.items() if not _is_word(w) and n >= 5)
        base = list(SPECIALS) + letters + ["##" + c for c in letters] + symbols
        room = vocab_size - len(base)
        if room < 0:
            raise ValueError(f"vocab {vocab_size} is smaller than the {len(base)} base pieces")
        ranked = sorted((w for w in words if _is_word(w) and len(w) > 1), key=lambda w: (-words[w], w))
        self.pieces = base + ranked[:room]
        self.n_words = len(ranked[:room])
        self.ids = {p: i for i, p in enumerate(self.pieces)}

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        ids = self.ids
        for w in _WORDS.findall(text.lower()):
            i = ids.get(w)
            if i is not None:
                out.append(i)
            elif _is_word(w):  # first letter, then ##letters
                out.append(ids[w[0]])
                out.extend(ids["##" + c] for c in w[1:])
            else:
                out.append(UNK)
        return out


@dataclasses.dataclass
class Dataset:
    train: np.ndarray  # (n, L) int32 token ids, [CLS] ... [SEP] then [PAD]
    held_out: np.ndarray
    meta: dict[str, Any]


def build_dataset(cfg: Config) -> Dataset:
    t0 = time.perf_counter()
    texts, corpus = stdlib_texts(cfg.max_files)
    if corpus["characters"] < 10_000:
        raise SystemExit(
            f"only {corpus['characters']} characters of docstrings under {corpus['stdlib']}: this Python's standard "
            "library ships without its .py sources, so there is no text to train on"
        )
    tok = Tokenizer(texts, cfg.vocab)
    span = cfg.seq_len - 2
    rows: list[list[int]] = []
    n_tokens = n_unk = 0
    for t in texts:
        ids = tok.encode(t)
        n_tokens += len(ids)
        n_unk += sum(i == UNK for i in ids)
        for s in range(0, len(ids), span):
            chunk = ids[s : s + span]
            if len(chunk) >= 8:  # shorter chunks leave almost nothing to mask
                rows.append([CLS, *chunk, SEP])
    arr = np.full((len(rows), cfg.seq_len), PAD, dtype=np.int32)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    held = np.arange(len(rows)) % 20 == 19
    if int((~held).sum()) < cfg.batch or int(held.sum()) == 0:
        raise SystemExit(f"{len(rows)} sequences are too few for batch {cfg.batch} and a held-out set")
    lengths = (arr != PAD).sum(1)
    meta = dict(
        corpus=corpus,
        tokens=n_tokens,
        unk_fraction=n_unk / max(n_tokens, 1),
        vocab=len(tok.pieces),
        whole_words=tok.n_words,
        sequences_train=int((~held).sum()),
        sequences_held_out=int(held.sum()),
        mean_length=float(lengths.mean()),
        real_token_fraction=float(lengths.mean() / cfg.seq_len),
        seconds=round(time.perf_counter() - t0, 1),
    )
    return Dataset(arr[~held], arr[held], meta)


def mask_batch(ids: np.ndarray, cfg: Config, g: torch.Generator) -> dict[str, torch.Tensor]:
    """BERT masking: each real non-special token selected with ``mask_prob``; of those 80% -> [MASK],
    10% -> a random word piece, 10% kept. Labels -100 on everything not selected."""
    x = torch.from_numpy(ids.astype(np.int64))
    real = x != PAD
    candidate = real & (x != CLS) & (x != SEP)
    selected = (torch.rand(x.shape, generator=g) < cfg.mask_prob) & candidate
    labels = torch.where(selected, x, torch.full_like(x, -100))
    r = torch.rand(x.shape, generator=g)
    random_ids = torch.randint(len(SPECIALS), cfg.vocab, x.shape, generator=g)
    x = torch.where(selected & (r < 0.8), torch.full_like(x, MASK), x)
    x = torch.where(selected & (r >= 0.8) & (r < 0.9), random_ids, x)
    return {"input_ids": x, "attention_mask": real.long(), "labels": labels}


def train_batch(ds: Dataset, cfg: Config, step: int) -> dict[str, torch.Tensor]:
    """The batch of ``step``: epochs of a fixed permutation per epoch (data seed), fresh masks per step."""
    n = len(ds.train)
    start = step * cfg.batch
    idx = []
    while len(idx) < cfg.batch:
        epoch, pos = divmod(start + len(idx), n)
        perm = np.random.default_rng(cfg.data_seed + epoch).permutation(n)
        take = min(cfg.batch - len(idx), n - pos)
        idx.extend(perm[pos : pos + take].tolist())
    g = torch.Generator().manual_seed(cfg.data_seed * 1_000_003 + step)
    return mask_batch(ds.train[idx], cfg, g)


def held_out_batches(ds: Dataset, cfg: Config) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(cfg.data_seed + 99)
    rows = ds.held_out[: cfg.eval_batches * cfg.batch]
    return [mask_batch(rows[i : i + cfg.batch], cfg, g) for i in range(0, len(rows), cfg.batch)]


# --- training -------------------------------------------------------------------------------------------------


def initial_model(cfg: Config) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.seq_len,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.init_seed)
    return BertForMaskedLM(config)


def _autocast(cfg: Config, device: torch.device) -> Any:
    if device.type == "cuda" and cfg.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def evaluate(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], cfg: Config, device: torch.device
) -> float:
    """Mean masked-LM loss over the held-out masked tokens (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            n = int((b["labels"] != -100).sum())
            if n == 0:
                continue
            with _autocast(cfg, device):
                loss = model(**b).loss
            total += float(loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def train_run(name: str, cfg: Config, ds: Dataset, init: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    patched, dropout_seed = RUNS[name]
    model = copy.deepcopy(init).to(device).train()
    if patched:
        import ptfast

        ptfast.patch(model, unpad=True)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=cfg.weight_decay,
        fused=cuda or None,
    )  # fmt: skip
    decay = max(1, cfg.steps - cfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / cfg.warmup if s < cfg.warmup else max(0.0, (cfg.steps - s) / decay)
    )
    held = held_out_batches(ds, cfg)
    losses = torch.zeros(cfg.steps, device=device)
    grad_norms = torch.zeros(cfg.steps, device=device)
    lrs: list[float] = []
    evals: list[tuple[int, float]] = [(0, evaluate(model, held, cfg, device))]
    real_tokens = 0
    torch.manual_seed(dropout_seed)  # CPU and every CUDA device: the dropout streams of this run
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        batch = train_batch(ds, cfg, step)
        real_tokens += int(batch["attention_mask"].sum())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        lrs.append(sched.get_last_lr()[0])
        with _autocast(cfg, device):
            loss = model(**batch).loss
        loss.backward()
        grad_norms[step] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evals.append((step + 1, evaluate(model, held, cfg, device)))
            train = float(losses[step])
            log(f"  [{name}] step {step + 1:>5}/{cfg.steps}  train {train:.4f}  held-out {evals[-1][1]:.4f}")
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    loss_list = losses.float().cpu().tolist()
    if not all(np.isfinite(loss_list)):
        log(f"  [{name}] WARNING: non-finite training losses")
    return dict(
        name=name,
        patched=patched,
        dropout_seed=dropout_seed,
        losses=loss_list,
        grad_norms=grad_norms.float().cpu().tolist(),
        lr=lrs,
        eval=evals,
        wall_s=round(wall, 2),
        real_tokens=real_tokens,
        real_tokens_per_s_informal=real_tokens / wall,
        peak_mem_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        dispatch=_dispatch_note(patched),
    )


def _dispatch_note(patched: bool) -> str | None:
    if not patched:
        return None
    try:
        import ptfast

        return f"ptfast {getattr(ptfast, '__version__', '?')}, backend {os.environ.get('PTFAST_BACKEND', 'auto')}"
    except Exception:  # noqa: BLE001
        return None


# --- comparison -----------------------------------------------------------------------------------------------


def smooth(x: list[float], w: int) -> np.ndarray:
    """Trailing moving average; element i covers steps i .. i + w - 1 (so it belongs to step i + w - 1)."""
    a = np.asarray(x, dtype=np.float64)
    w = max(1, min(w, len(a)))
    return np.convolve(a, np.ones(w) / w, mode="valid")


def _gap(a: list[float], b: list[float], w: int) -> dict[str, float]:
    d = np.abs(smooth(a, w) - smooth(b, w))
    return {"max": float(d.max()), "mean": float(d.mean()), "final": float(d[-1])}


def _eval_gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> dict[str, float]:
    d = np.abs(np.array([v for _, v in a]) - np.array([v for _, v in b]))
    return {"max": float(d.max()), "mean": float(d.mean()), "final": float(d[-1])}


def compare(runs: dict[str, dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Gaps between stock and ptfast runs with the same seed; noise between same-implementation runs."""
    names = list(runs)
    cross, noise = [], []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ra, rb = runs[a], runs[b]
            pair = {
                "a": a,
                "b": b,
                "train": _gap(ra["losses"], rb["losses"], cfg.smooth),
                "held_out": _eval_gap(ra["eval"], rb["eval"]),
            }
            if ra["patched"] != rb["patched"] and ra["dropout_seed"] == rb["dropout_seed"]:
                cross.append(pair)
            elif ra["patched"] == rb["patched"] and ra["dropout_seed"] != rb["dropout_seed"]:
                noise.append(pair)
    out: dict[str, Any] = {"cross_pairs": cross, "noise_pairs": noise, "tolerance": cfg.tolerance}
    if cross and noise:
        verdict = {}
        for curve in ("train", "held_out"):
            g = {k: max(p[curve][k] for p in cross) for k in ("max", "mean")}
            n = {k: max(p[curve][k] for p in noise) for k in ("max", "mean")}
            ratio = {k: g[k] / n[k] if n[k] > 0 else float("inf") for k in g}
            verdict[curve] = {
                "gap": g,
                "noise": n,
                "ratio": ratio,
                "within_noise": all(r <= cfg.tolerance for r in ratio.values()),
            }
        out["verdict"] = verdict
    return out


# --- outputs --------------------------------------------------------------------------------------------------


def write_csv(out: Path, runs: dict[str, dict[str, Any]], cfg: Config) -> None:
    names = list(runs)
    with (out / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr"] + [f"loss_{n}" for n in names] + [f"grad_norm_{n}" for n in names])
        first = runs[names[0]]
        for s in range(cfg.steps):
            w.writerow(
                [s + 1, f"{first['lr'][s]:.6g}"]
                + [f"{runs[n]['losses'][s]:.6f}" for n in names]
                + [f"{runs[n]['grad_norms'][s]:.6f}" for n in names]
            )
    with (out / "eval.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [f"held_out_loss_{n}" for n in names])
        for i, (step, _) in enumerate(first["eval"]):
            w.writerow([step] + [f"{runs[n]['eval'][i][1]:.6f}" for n in names])


def plot(path: Path, runs: dict[str, dict[str, Any]], cmp: dict[str, Any], cfg: Config, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"stock": "tab:blue", "ptfast": "tab:orange", "stock-seed2": "tab:green", "ptfast-seed2": "tab:red"}
    w = cfg.smooth
    for name, r in runs.items():
        steps = np.arange(1, cfg.steps + 1)
        axes[0].plot(steps, r["losses"], color=colors.get(name), alpha=0.15, lw=0.6)
        s = smooth(r["losses"], w)
        axes[0].plot(steps[len(steps) - len(s) :], s, color=colors.get(name), lw=1.4, label=name)
        ev = np.array(r["eval"])
        axes[1].plot(ev[:, 0], ev[:, 1], "o-", ms=2.5, color=colors.get(name), label=name)
    axes[0].set_title(f"training loss (faint: per step; line: trailing mean of {w})", fontsize=9, loc="left")
    axes[1].set_title("held-out masked-LM loss (dropout off, fixed masks)", fontsize=9, loc="left")
    for pair, style in [(p, "-") for p in cmp["cross_pairs"]] + [(p, "--") for p in cmp["noise_pairs"]]:
        a, b = runs[pair["a"]]["losses"], runs[pair["b"]]["losses"]
        d = smooth(b, w) - smooth(a, w)
        axes[2].plot(np.arange(cfg.steps - len(d) + 1, cfg.steps + 1), d, style, lw=1.2,
                     label=f"{pair['b']} - {pair['a']}" + (" (noise)" if style == "--" else ""))  # fmt: skip
    axes[2].axhline(0, color="0.5", lw=0.8)
    axes[2].set_title("difference of smoothed training losses", fontsize=9, loc="left")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss")
    fig.text(
        0.01, 0.01,
        f"{meta.get('device')} · torch {meta.get('torch')} · transformers {meta.get('transformers')} · "
        f"{meta.get('date_utc')} · commit {meta.get('git_commit')}",
        fontsize=7, color="0.4",
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    cfg, meta, data, runs, cmp = (result[k] for k in ("config", "metadata", "data", "runs", "comparison"))
    corpus = data["corpus"]
    lines = ["# Convergence: small BERT masked-LM, stock Hugging Face vs ptfast.patch(unpad=True)", ""]
    lines.append(
        f"Device: **{meta.get('device')}** · torch {meta.get('torch')} · transformers {meta.get('transformers')} · "
        f"triton {meta.get('triton')} · ptfast {meta.get('ptfast')} · Python {meta.get('python')}"
    )
    lines.append(
        f"Date (UTC): {meta.get('date_utc')} · commit `{meta.get('git_commit')}`"
        + (" (dirty tree)" if meta.get("git_dirty") else "")
    )
    lines.append(f"Command: `{meta.get('command')}`")
    lines.append("")
    lines += ["## Result", ""]
    verdict = cmp.get("verdict")
    if verdict:
        for curve, label in (("train", "training loss (smoothed)"), ("held_out", "held-out loss")):
            v = verdict[curve]
            word = "**within run-to-run noise**" if v["within_noise"] else "**NOT within run-to-run noise**"
            lines.append(
                f"- {label}: stock vs ptfast max gap {v['gap']['max']:.4f}, mean gap {v['gap']['mean']:.4f}; noise "
                f"(same implementation, other dropout seed) max {v['noise']['max']:.4f}, mean "
                f"{v['noise']['mean']:.4f}; ratios {v['ratio']['max']:.2f} / {v['ratio']['mean']:.2f} -> {word} "
                f"(rule: both ratios <= {cmp['tolerance']:g})"
            )
    else:
        lines.append("- No verdict: needs a stock and a ptfast run with the same seed and a noise pair.")
    lines.append("")
    lines += [
        "| run | implementation | dropout seed | final smoothed train loss | final held-out loss | "
        "min held-out loss | wall s | real tokens/s (informal) | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        s = smooth(r["losses"], cfg["smooth"])
        peak = "–" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:,.0f}"
        lines.append(
            f"| {name} | {'ptfast.patch(unpad=True)' if r['patched'] else 'stock (sdpa)'} | {r['dropout_seed']} | "
            f"{s[-1]:.4f} | {r['eval'][-1][1]:.4f} | {min(v for _, v in r['eval']):.4f} | {r['wall_s']:.1f} | "
            f"{r['real_tokens_per_s_informal']:,.0f} | {peak} |"
        )
    lines.append("")
    if cmp["cross_pairs"] or cmp["noise_pairs"]:
        lines += [
            "| pair | kind | train max gap | train mean gap | train final gap | held-out max gap | "
            "held-out final gap |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for kind, pairs in (("stock vs ptfast", cmp["cross_pairs"]), ("noise", cmp["noise_pairs"])):
            for p in pairs:
                t, h = p["train"], p["held_out"]
                lines.append(
                    f"| {p['a']} / {p['b']} | {kind} | {t['max']:.4f} | {t['mean']:.4f} | {t['final']:.4f} | "
                    f"{h['max']:.4f} | {h['final']:.4f} |"
                )
        lines.append("")
    lines += ["## Setup", ""]
    lines.append(
        f"- Model: BertForMaskedLM, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
        f"intermediate {cfg['intermediate']}, vocab {cfg['vocab']}, dropout {cfg['dropout']} (hidden and attention), "
        f"max length {cfg['seq_len']}; the same initial weights (seed {cfg['init_seed']}) for every run."
    )
    precision = "bf16 autocast" if cfg["device"] == "cuda" and cfg["dtype"] == "bf16" else "fp32"
    lines.append(
        f"- Training: {cfg['steps']} steps of batch {cfg['batch']} (padded to {cfg['seq_len']}), AdamW lr "
        f"{cfg['lr']:g} (warm-up {cfg['warmup']} steps, then linear decay to 0), weight decay {cfg['weight_decay']}, "
        f"gradient clipping {cfg['clip']}, {precision}"
        f"; masking {cfg['mask_prob']:.0%} of real tokens (80/10/10), the same batches and masks in every run "
        f"(data seed {cfg['data_seed']}); eager mode (no torch.compile)."
    )
    lines.append(
        f"- Data: docstrings of the Python {corpus['python']} standard library ({corpus['files']} files, "
        f"{corpus['docstrings']} docstrings) + {corpus['pydoc_topics']} pydoc topics, {corpus['characters']:,} "
        f"characters, sha256 `{corpus['sha256'][:16]}…`; {data['tokens']:,} tokens, vocabulary {data['vocab']}, "
        f"[UNK] {data['unk_fraction']:.2%}; {data['sequences_train']:,} training / {data['sequences_held_out']:,} "
        f"held-out sequences, mean length {data['mean_length']:.1f} ({data['real_token_fraction']:.0%} real tokens); "
        f"{cfg['steps'] * cfg['batch'] / max(data['sequences_train'], 1):.1f} epochs."
    )
    lines.append(
        f"- Held-out loss: {cfg['eval_batches']} batches of held-out sequences with fixed masks, every "
        f"{cfg['eval_every']} steps, model in eval mode (no dropout)."
    )
    lines.append(
        f"- Smoothing: trailing mean over {cfg['smooth']} steps. Gap = |difference| of smoothed curves over all "
        "steps where the window is full. Throughput numbers are informal (wall clock of the whole run, data "
        "preparation and evaluation included); see `bert_mlm_step` for measured step times."
    )
    lines += ["", "Files: `convergence.json`, `curves.csv`, `eval.csv`, `convergence.png`.", ""]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------------


def _code_hash() -> str:
    """Hash of ptfast's sources and this script: a cached run is reused only if neither changed."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "ptfast").rglob("*.py")) + [Path(__file__)]:
        h.update(f.relative_to(ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _fingerprint(cfg: Config, data_meta: dict[str, Any], name: str, device_name: str) -> str:
    key = dict(
        config=dataclasses.asdict(cfg),
        corpus=data_meta["corpus"]["sha256"],
        run=name,
        device=device_name,
        torch=torch.__version__,
        transformers=env._version("transformers"),
        code=_code_hash(),
    )
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 3000; --quick 60)")
    ap.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>/convergence "
                    "on CUDA, a temporary directory on CPU)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny model and corpus subset: a CPU smoke run")
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--smooth", type=int, default=None, help="smoothing window in steps (default 100; --quick 10)")
    ap.add_argument("--tolerance", type=float, default=None, help="gap / noise ratio still called agreement (2)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="CUDA autocast dtype (CPU: fp32)")
    ap.add_argument("--fresh", action="store_true", help="recompute runs even if runs/<name>.json matches")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda asked for but no CUDA device is visible")
        return 2
    cfg = quick_config(device.type, args.steps) if args.quick else Config(device=device.type)
    overrides: dict[str, Any] = {"dtype": args.dtype if device.type == "cuda" else "fp32"}
    if args.steps and not args.quick:
        overrides.update(steps=args.steps, warmup=max(1, args.steps // 10))
    for key in ("batch", "lr", "smooth", "tolerance"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = dataclasses.replace(cfg, **overrides)
    if args.quick and device.type == "cpu":
        # The tiny model is faster on one thread, and on a shared machine several OpenMP threads spinning for
        # cores make a smoke run 3-5x slower.
        torch.set_num_threads(1)
    if args.out:
        out = Path(args.out)
    elif device.type == "cuda":
        out = ROOT / "benchmarks" / "results" / env.device_slug(device) / "convergence"
    else:
        out = Path(tempfile.gettempdir()) / "ptfast-bench" / env.device_slug(device) / "convergence"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    meta = env.collect(device, argv)
    meta["command"] = shlex.join([Path(sys.executable).name, "-m", "benchmarks.convergence", *argv])
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        log(f"transformers is needed: {e}")
        return 2
    t_all = time.perf_counter()
    log(f"device {meta['device']} · torch {meta['torch']} · out {out}")
    ds = build_dataset(cfg)
    d = ds.meta
    log(
        f"corpus: {d['corpus']['files']} files, {d['corpus']['docstrings']} docstrings + {d['corpus']['pydoc_topics']}"
        f" topics, {d['tokens']:,} tokens ([UNK] {d['unk_fraction']:.2%}), {d['sequences_train']} train / "
        f"{d['sequences_held_out']} held-out sequences, mean length {d['mean_length']:.1f} ({d['seconds']}s)"
    )
    init = initial_model(cfg)
    runs: dict[str, dict[str, Any]] = {}
    for name in RUNS:  # canonical order, whatever the order of --runs
        path = out / "runs" / f"{name}.json"
        fp = _fingerprint(cfg, d, name, str(meta["device"]))
        if name not in args.runs:
            if path.exists() and not args.fresh:
                old = json.loads(path.read_text())
                if old.get("fingerprint") == fp:
                    runs[name] = old
                    log(f"[{name}] reusing {path} (same configuration and code)")
            continue
        if path.exists() and not args.fresh:
            old = json.loads(path.read_text())
            if old.get("fingerprint") == fp:
                runs[name] = old
                log(f"[{name}] reusing {path} (same configuration and code; --fresh recomputes)")
                continue
        log(f"[{name}] training {cfg.steps} steps")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = train_run(name, cfg, ds, init, device)
        r["fingerprint"] = fp
        path.write_text(json.dumps(r) + "\n")
        runs[name] = r
        log(f"[{name}] done in {r['wall_s']:.1f}s")
    cmp = compare(runs, cfg)
    result = {
        "config": dataclasses.asdict(cfg),
        "metadata": meta,
        "data": d,
        "runs": runs,
        "comparison": cmp,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "convergence.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_csv(out, runs, cfg)
    (out / "convergence.md").write_text(markdown(result))
    if not args.no_plot:
        plot(out / "convergence.png", runs, cmp, cfg, meta)
    for curve, v in (cmp.get("verdict") or {}).items():
        log(
            f"{curve}: gap max {v['gap']['max']:.4f} mean {v['gap']['mean']:.4f} | noise max {v['noise']['max']:.4f} "
            f"mean {v['noise']['mean']:.4f} -> {'within' if v['within_noise'] else 'NOT within'} run-to-run noise"
        )
    log(f"wrote {out}/convergence.{{json,md,png}}, curves.csv, eval.csv in {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
