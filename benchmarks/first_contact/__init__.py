"""First contact with a GPU: one command that turns a short GPU loan into verified, committed results.

``bash scripts/gpu_run.sh first-contact`` runs, on a bare GPU machine (``python -m benchmarks.first_contact``):

1. ``smoke`` (:mod:`.smoke`): every kernel family in every hot variant (the conv ones include ResNet's 7x7 stem,
   strided and 1x1 convs and residual tails), bf16 and fp16, forward and backward once, against the float64 oracle
   by the rule of docs/design.md §5, plus a patched tiny BERT and VGG training step and an eval-mode tiny ResNet
   (BatchNorm folded, blocks fused) on the triton and cuda backends. Each family runs in its own process (an
   illegal address in one cannot poison the others) and ends as passed, failed (with the error) or skipped (with
   the reason).
2. ``headline`` (:mod:`.headline`): the benchmarks that decide whether a kernel earns its place, each side by side
   with its baselines in one run and each ptfast backend's output and gradients checked against the torch
   backend's (``benchmarks.run --check-backends``).
3. ``record``: the verification record (:mod:`ptfast.verification`): an entry per benchmarked shape class, verified
   when its family passed the smoke test, its outputs matched the torch backend and it measured faster. On a GPU it
   is written into ``ptfast/verified.json`` (commit it); a CPU rehearsal writes it to the output folder only.
4. ``tier`` (:mod:`.tier`): the rest of the GPU test tier in slices of under 8 minutes, most valuable first.

On a CPU machine the same command is a rehearsal (CPU device, Triton interpreter, fp16, tiny shapes, the same
steps and the same archive layout); CI runs it, so the script is known to work before a GPU ever sees it.
"""
