"""Patched models under ``DistributedDataParallel`` and FSDP2 (``fully_shard``): two CPU processes (gloo)
against one process.

Each rank runs a patched model on its half of a batch; DDP / FSDP2 average the gradients. A single process
computes the same average directly (``(loss(half 0) + loss(half 1)) / 2``) on a patched copy with the same
weights; the gradients rank 0 ends up with (FSDP2: gathered from the shards) must equal it (float64, dropout
off). Models: a torchvision-layout VGG (fused conv modules) and a Hugging Face ``BertForMaskedLM`` (ptfast
attention and the fused masked-LM head), padded and unpadded. One pair of processes runs every case (spawning
and importing dominate the cost).
"""

from __future__ import annotations

import faulthandler
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ptfast

WORLD = 2


def _vgg():
    from tests.test_nn_patch import tiny_vgg

    torch.manual_seed(0)
    return tiny_vgg().double()


def _vgg_batch(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(3, 3, 19, 17, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (3,), generator=g)
    return x, y


def _vgg_loss(model, rank: int):
    x, y = _vgg_batch(rank)
    return torch.nn.functional.cross_entropy(model(x), y)


def _bert():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    return transformers.BertForMaskedLM(config).double().train()


def _bert_loss(model, rank: int):
    g = torch.Generator().manual_seed(20 + rank)
    ids = torch.randint(1, 97, (3, 11), generator=g)
    mask = (torch.arange(11)[None, :] < torch.tensor([11, 6, 9])[:, None]).long()
    labels = torch.full((3, 11), -100)
    masked = (torch.rand(3, 11, generator=g) < 0.3) & mask.bool()
    masked[0, 1] = True
    labels[masked] = torch.randint(0, 97, (3, 11), generator=g)[masked]
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


MODELS = {
    "vgg": (_vgg, _vgg_loss, {}),
    "bert": (_bert, _bert_loss, {}),
    "bert_unpad": (_bert, _bert_loss, {"unpad": True}),
}


def _fully_shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():  # the usual granularity: each conv / transformer layer, then the root
        if isinstance(module, torch.nn.Conv2d) or type(module).__name__ == "BertLayer":
            fully_shard(module)
    fully_shard(model)
    return model


def _worker(rank: int, port: int, cases: list[tuple[str, str]], out_dir: str) -> None:
    # A worker killed by a signal (a C++ abort) reaches the parent only as "terminated with signal": its stderr
    # (where C++ writes why) and the Python stack of every thread go to a file the fixture then reports.
    log = open(os.path.join(out_dir, f"rank{rank}.stderr"), "w", buffering=1)  # noqa: SIM115 (lives as long)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    finished = False
    try:
        for wrapper, kind in cases:
            print(f"rank {rank}: {wrapper}-{kind}", file=log)
            build, loss_fn, patch_kw = MODELS[kind]
            model = ptfast.patch(build(), **patch_kw)
            # Keep the wrapper referenced until backward ends: DDP's reducer lives on the DDP object. FSDP2
            # averages gradients too (reduce-scatter, then divide by the world size).
            wrapped = torch.nn.parallel.DistributedDataParallel(model) if wrapper == "ddp" else _fully_shard(model)
            loss_fn(wrapped, rank).backward()
            grads = {}
            for name, p in model.named_parameters():
                if p.grad is not None:
                    g = p.grad
                    grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()  # collective
            if rank == 0:
                torch.save(grads, os.path.join(out_dir, f"{wrapper}-{kind}.pt"))
        finished = True
    finally:
        # Tear down only when both ranks are done: a rank that closes its connections while the other still
        # uses them makes gloo abort that other process. (After an error a barrier could wait forever: skip it.)
        if finished:
            dist.barrier()
        dist.destroy_process_group()
        print(f"rank {rank}: done", file=log)
    # Every result is written: leave without the interpreter's and C++'s exit-time teardown. After the work and the
    # process group were done, torch 2.13 aborted a rank at exit ("terminate called without an active exception",
    # no Python frame: a joinable C++ thread destroyed at exit), which failed CI's floor leg twice.
    log.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WRAPPERS = ("ddp", "fsdp2")


def _kinds() -> list[str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return ["vgg"]
    return list(MODELS)


def _cases() -> list[tuple[str, str]]:
    return [(w, k) for w in WRAPPERS for k in _kinds()]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("ddp")
    args = (_free_port(), _cases(), str(out_dir))
    try:
        mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="spawn")
    except mp.ProcessExitedException as e:  # killed by a signal: say where and why (the workers' own stderr)
        logs = "".join(f"\n--- {p.name} ---\n{p.read_text()}" for p in sorted(out_dir.glob("rank*.stderr")))
        raise RuntimeError(f"{e}{logs}") from e
    return out_dir


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_distributed_gradients_equal_single_process(wrapper: str, kind: str, ddp_results: Path) -> None:
    if kind not in _kinds():
        pytest.skip("transformers is not installed")
    ddp_grads = torch.load(ddp_results / f"{wrapper}-{kind}.pt")

    build, loss_fn, patch_kw = MODELS[kind]
    model = ptfast.patch(build(), **patch_kw)
    ((loss_fn(model, 0) + loss_fn(model, 1)) / WORLD).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ddp_grads.keys() == expected.keys() and len(expected) > 5
    for name, g in expected.items():
        torch.testing.assert_close(ddp_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
