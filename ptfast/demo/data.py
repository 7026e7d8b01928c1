"""Real data that exists offline on every machine, made deterministic.

* Text: the docstrings of a fixed list of Python standard-library modules (modules, their public classes and
  functions, and the classes' public methods), walked in sorted order.
* A WordPiece tokenizer learned on that text. The merges are learned here (BPE-style, ties broken by the
  pieces' strings) and the vocabulary is handed to the ``tokenizers`` library's ``WordPiece`` model with its BERT
  normalizer and pre-tokenizer, which then encode. ``tokenizers``' own ``WordPieceTrainer`` is not used: it gives
  a different vocabulary from one process to the next on the same text (the ids of the ``##`` pieces follow a
  Rust ``HashMap``'s iteration order, and merge ties are broken by id).
* Masked-LM examples: paragraphs packed into sequences whose lengths are spread over [L/4, L], batches padded
  to the longest sequence, 15% of the real tokens masked with the 80/10/10 rule, all from seeded generators.
* Docstring classification: which of a few modules a docstring comes from (the module's name scrubbed from
  the text), split into train / validation by docstring; validation docstrings are kept out of pretraining.
* Images: scikit-learn's bundled 8x8 handwritten digits, upscaled.
"""

from __future__ import annotations

import heapq
import importlib
import inspect
import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))

#: Standard-library modules whose docstrings make the text corpus (a module missing from a Python build is
#: skipped and named in the report).
CORPUS_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email.message", "enum", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers",
    "mailbox", "math", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pickletools", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipfile", "zoneinfo",
)  # fmt: skip

#: The classification task: which of these modules a docstring comes from.
CLASS_MODULES = ("ast", "decimal", "inspect", "logging", "mailbox", "ssl", "tarfile", "typing")


# --- text -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    module: str  # the module of CORPUS_MODULES it was found in
    where: str  # qualified name of the documented object
    text: str


def _owned(obj: object, module_name: str) -> bool:
    owner = getattr(obj, "__module__", None)
    return isinstance(owner, str) and (owner == module_name or owner.startswith(module_name + "."))


def module_docs(module_name: str) -> list[Doc]:
    """Docstrings of a module, its public classes and functions, and the classes' public methods (sorted)."""
    module = importlib.import_module(module_name)
    docs: list[Doc] = []

    def add(where: str, obj: object) -> None:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            docs.append(Doc(module_name, where, inspect.cleandoc(doc)))

    add(module_name, module)
    members = vars(module)
    for name in sorted(members):
        obj = members[name]
        if name.startswith("_") or inspect.ismodule(obj) or not _owned(obj, module.__name__):
            continue
        if isinstance(obj, type):
            add(f"{module_name}.{name}", obj)
            attrs = vars(obj)
            for attr in sorted(attrs):
                value = attrs[attr]
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                elif isinstance(value, property):
                    value = value.fget
                if not attr.startswith("_") and callable(value):
                    add(f"{module_name}.{name}.{attr}", value)
        elif callable(obj):
            add(f"{module_name}.{name}", obj)
    return docs


def collect_docs(modules: tuple[str, ...] = CORPUS_MODULES) -> tuple[list[Doc], list[str]]:
    """Every docstring of ``modules`` in a fixed order, each text once; also the modules that could not load."""
    docs: list[Doc] = []
    missing: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                found = module_docs(name)
            except Exception:  # noqa: BLE001 - a stdlib module absent from this Python build
                missing.append(name)
                continue
            for doc in found:
                if doc.text not in seen:  # inherited / re-exported docstrings count once
                    seen.add(doc.text)
                    docs.append(doc)
    return docs, missing


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# --- tokenizer --------------------------------------------------------------------------------------------


def _pre_tokenizers():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()


def learn_wordpiece_vocab(texts: list[str], vocab_size: int, min_frequency: int = 2) -> list[str]:
    """WordPiece vocabulary (BERT's ``##`` continuation pieces) learned by BPE-style merges, deterministically.

    The pieces are the special tokens, every character seen (alone and as ``##c``), then merged pieces in the
    order they were learned; the most frequent pair is merged first, ties broken by the pair's strings.
    """
    normalizer, pre = _pre_tokenizers()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted(counts)
    freq = [counts[w] for w in words]
    seqs = [[w[0], *("##" + c for c in w[1:])] for w in words]
    alphabet = sorted({piece for seq in seqs for piece in seq})
    vocab = [*SPECIAL_TOKENS, *alphabet]
    pair_count: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:], strict=False):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        current = pair_count.get((a, b), 0)
        if current != -neg:  # stale entry: requeue with the current count
            if current > 0:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_frequency:
            break
        new = a + b[2:]  # b is always a ## continuation piece
        vocab.append(new)
        for i in sorted(where.pop((a, b))):
            seq = seqs[i]
            merged: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            for pair in zip(seq, seq[1:], strict=False):
                pair_count[pair] -= freq[i]
            for pair in zip(merged, merged[1:], strict=False):
                pair_count[pair] += freq[i]
                where[pair].add(i)
                heapq.heappush(heap, (-pair_count[pair], *pair))
            seqs[i] = merged
        pair_count.pop((a, b), None)
    return vocab


def build_tokenizer(vocab: list[str]):
    """A ``tokenizers.Tokenizer`` (WordPiece, BERT normalizer / pre-tokenizer, [CLS] ... [SEP]) on ``vocab``."""
    from tokenizers import Tokenizer, models, processors

    tokenizer = Tokenizer(models.WordPiece({tok: i for i, tok in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = _pre_tokenizers()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)]
    )
    return tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    return build_tokenizer(learn_wordpiece_vocab(texts, vocab_size))


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without [CLS] / [SEP]."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


# --- masked-LM examples and batches -----------------------------------------------------------------------


def pack_examples(token_lists: list[list[int]], max_len: int, seed: int) -> list[list[int]]:
    """Pack paragraphs (in order) into ``[CLS] ... [SEP]`` examples whose lengths spread over [max_len/4, max_len].

    Each example draws a target length uniformly from [max_len/4, max_len] (seeded) and takes paragraphs until
    it is reached; a paragraph longer than the room left is cut (the rest starts the next example).
    """
    rng = random.Random(seed)
    room_max = max_len - 2
    lo = max(1, max_len // 4 - 2)
    examples: list[list[int]] = []
    current: list[int] = []
    target = rng.randint(lo, room_max)
    for tokens in token_lists:
        rest = list(tokens)
        while rest:
            take = rest[: target - len(current)]
            current += take
            rest = rest[len(take) :]
            if len(current) >= target:
                examples.append([CLS_ID, *current, SEP_ID])
                current, target = [], rng.randint(lo, room_max)
    if len(current) >= lo:
        examples.append([CLS_ID, *current, SEP_ID])
    return examples


def pad_batch(examples: list[list[int]], multiple: int = 8) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` padded on the right to the longest example, rounded up to ``multiple``."""
    longest = max(len(e) for e in examples)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def mask_tokens(
    input_ids: Tensor, attention_mask: Tensor, vocab_size: int, generator: torch.Generator, prob: float = 0.15
) -> tuple[Tensor, Tensor]:
    """BERT masking (the rule of HF's ``DataCollatorForLanguageModeling``): ``(masked_ids, labels)``.

    Each real, non-special token is selected with probability ``prob``; a selected token is replaced by [MASK]
    80% of the time, by a random non-special token 10%, and kept 10%. ``labels`` holds the original id at
    selected positions and ``IGNORE_INDEX`` everywhere else. Padding and special tokens are never selected.
    """
    special = (input_ids < len(SPECIAL_TOKENS)) | (attention_mask == 0)
    probs = torch.full(input_ids.shape, prob)
    selected = torch.bernoulli(probs, generator=generator).bool() & ~special
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    ids = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & selected
    ids[to_mask] = MASK_ID
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=generator)
    ids[to_random] = random_ids[to_random]
    return ids, labels


@dataclass
class MLMBatch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def mlm_batches(examples: list[list[int]], batch_size: int, steps: int, vocab_size: int, seed: int) -> list[MLMBatch]:
    """``steps`` masked batches: epochs of a seeded shuffle of ``examples``, masking from a seeded generator."""
    order_gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + 1)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=order_gen).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        ids, mask = pad_batch([examples[i] for i in chosen])
        masked, labels = mask_tokens(ids, mask, vocab_size, mask_gen)
        batches.append(MLMBatch(masked, mask, labels))
    return batches


# --- docstring classification -----------------------------------------------------------------------------


@dataclass
class ClassificationData:
    labels: tuple[str, ...]
    train_texts: list[str]
    train_y: list[int]
    val_texts: list[str]
    val_y: list[int]


def scrub_module_name(text: str, module: str) -> str:
    """Remove the module's own name (any case, also inside words such as ``TarFile``) from a docstring."""
    return re.sub(re.escape(module.split(".")[-1]), " ", text, flags=re.IGNORECASE)


def classification_split(docs: list[Doc], val_fraction: float, seed: int) -> ClassificationData:
    """Docstrings of ``CLASS_MODULES`` present in ``docs``, split per module (seeded) into train / validation."""
    labels = tuple(m for m in CLASS_MODULES if any(d.module == m for d in docs))
    rng = random.Random(seed)
    data = ClassificationData(labels, [], [], [], [])
    for y, module in enumerate(labels):
        texts = [scrub_module_name(d.text, module) for d in docs if d.module == module]
        rng.shuffle(texts)
        n_val = max(1, round(len(texts) * val_fraction))
        data.val_texts += texts[:n_val]
        data.val_y += [y] * n_val
        data.train_texts += texts[n_val:]
        data.train_y += [y] * (len(texts) - n_val)
    return data


def classification_examples(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [[CLS_ID, *ids[: max_len - 2], SEP_ID] for ids in encode(tokenizer, texts)]


def classification_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index lists for ``steps`` batches over ``n`` examples: epochs of a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


# --- images -----------------------------------------------------------------------------------------------


def load_digits_images(size: int, seed: int, test_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits as ``(N, 1, size, size)`` float images (bilinear upscale, normalized).

    Returns ``(x_train, y_train, x_test, y_test)``, split per class with a seeded shuffle.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return x[tr], y[tr], x[te], y[te]
