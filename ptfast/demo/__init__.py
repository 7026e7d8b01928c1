"""``python -m ptfast.demo``: the classic pretrain-then-fine-tune workflows, stock PyTorch and ptfast side by side.

1. masked-LM pretraining of a small Hugging Face BERT on the docstrings of Python's standard library (a WordPiece
   vocabulary learned on them, variable-length padded batches, 15% masking);
2. fine-tuning the pretrained encoder to tell which stdlib module a docstring comes from;
3. a VGG in torchvision's layout on scikit-learn's digits: pretrained on half the classes, fine-tuned frozen then
   unfrozen;
4. a hand-written VGG (one attribute per conv / ReLU / pool layer) trained from scratch on the digits;
5. a ResNet in torchvision's layout on the digits: pretrained on half the classes, then a new ``fc`` with the
   backbone frozen in ``eval()`` (the patched twin folds every BatchNorm into its conv), then unfrozen in ``train()``.

Each stage trains a stock model and a ``ptfast.patch``-ed deep copy on the same batches: a parity phase with
dropout off (losses match step by step), then training with dropout on (loss curves compared), with step time,
peak memory and which ptfast backend ran. Writes ``report.md`` and ``loss_curves.png`` (``--out``).
``--smoke`` is the CI mode; ``--tour`` runs the quick op-by-op tour (:mod:`ptfast.demo.tour`).

Needs the ``demo`` extra (transformers, matplotlib, tqdm, scikit-learn): ``pip install 'ptfast[demo]'``.
"""

from __future__ import annotations

import importlib.util
import sys

#: Import name -> distribution name of what the workflow needs beyond ptfast's own dependencies.
DEMO_REQUIREMENTS = {
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
}


def missing_requirements() -> list[str]:
    """Distribution names of the demo's optional dependencies that cannot be imported here."""
    return [dist for module, dist in DEMO_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tour"] or "--tour" in argv:
        from ptfast.demo import tour

        rest = argv[1:] if argv[:1] == ["tour"] else [a for a in argv if a != "--tour"]
        return tour.main(rest)
    if "-h" not in argv and "--help" not in argv:
        missing = missing_requirements()
        if missing:
            print(
                f"python -m ptfast.demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                "not installed. Install the demo's dependencies with:\n\n    pip install 'ptfast[demo]'\n\n"
                "(`python -m ptfast.demo --tour` runs the quick op-by-op tour without them.)",
                file=sys.stderr,
            )
            return 2
    from ptfast.demo import workflow

    return workflow.run(argv)
