"""The first-contact tooling (``benchmarks.first_contact``) without a GPU: the pieces must fit each other.

* every smoke family names the shape-class family ``ptfast.verification`` builds for that op (otherwise a passed
  smoke test would vouch for nothing), and every class the headline benchmarks measure has a smoke family (the
  ResNet conv specializations included: 7x7 stride-2 stem, strided 3x3 and 1x1, residual tails);
* benchmark results become record rows (speed-up over the torch twin, spread, check verdict, shape class) and a
  record that ``auto`` decides by;
* per-test durations are read from pytest's junit XML.

The whole command runs end to end on the CPU in CI (``bash scripts/gpu_run.sh first-contact``, the rehearsal),
which also checks that the GPU-tier slices hold every GPU test exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.first_contact import headline, smoke, tier
from ptfast import verification

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _class_family(fam: smoke.Family) -> str:
    """The family part of the shape class the op would compute for this family's inputs."""
    dtype = DTYPES[fam.dtype]
    if fam.op in ("attention", "attention_varlen"):
        form = fam.params["form"]
        cls = verification.attention_class(
            dtype, fam.params["d"], 100, attn_mask=False, key_mask=form == "bert", dropout=form.startswith("bert"),
            causal=form == "causal", varlen=fam.op == "attention_varlen",
        )  # fmt: skip
    elif fam.op == "masked_lm_loss":
        cls = verification.masked_lm_loss_class(dtype, 768)
    elif fam.op == "add_relu":
        cls = verification.add_relu_class(dtype, fam.params["layout"] == "channels_last", 64 * 256 * 56 * 56)
    else:
        k = fam.params["k"]
        cls = verification.conv_class(dtype, fam.params["layout"] == "channels_last", (64, 64, k, k),
                                      fam.op == "conv_relu_pool", stride=fam.params["stride"],
                                      residual=fam.params["residual"])  # fmt: skip
    return cls.rsplit("/", 1)[0]


# The ResNet specializations of conv_relu: (family tail, a representative weight shape, stride, residual).
RESNET_FAMILIES = [
    ("channels_last/k7x7/s2/nopool", (64, 3, 7, 7), 2, False),
    ("channels_last/k3x3/s2/nopool", (128, 128, 3, 3), 2, False),
    ("channels_last/k3x3/residual/nopool", (256, 256, 3, 3), 1, True),
    ("nchw/k3x3/residual/nopool", (64, 64, 3, 3), 1, True),
    ("channels_last/k1x1/nopool", (64, 256, 1, 1), 1, False),
    ("channels_last/k1x1/s2/nopool", (1024, 512, 1, 1), 2, False),
    ("channels_last/k1x1/residual/nopool", (256, 64, 1, 1), 1, True),
]


@pytest.mark.parametrize("cpu", [False, True], ids=["device-run", "cpu-rehearsal"])
def test_smoke_families_name_the_verification_families(cpu: bool) -> None:
    fams = smoke.families(cpu)
    assert len({f.name for f in fams}) == len(fams)
    for fam in fams:
        if fam.op == "model":
            assert fam.covers and not fam.family
            continue
        assert fam.family == _class_family(fam), fam.name
    if not cpu:
        # a failing model step fails op families that exist (the rehearsal's fp32 model steps cover none)
        covered = {(f.op, f.backend, f.family) for f in fams}
        for fam in fams:
            for op, family in fam.covers:
                assert (op, fam.backend, family) in covered, (fam.name, op, family)
        # the hot variants: four attention forms x two half types x two head dims, every conv family on both
        # backends (4 VGG ones and 7 ResNet ones per half type), the masked-LM loss, and the six model steps
        assert sum(f.kind == "attention" for f in fams) == 16
        assert sum(f.kind == "conv" for f in fams) == 2 * 2 * (4 + 7)
        assert sum(f.op == "model" for f in fams) == 6
        # add_relu: both backends x two half types x both layouts
        assert {f.name for f in fams if f.op == "add_relu"} == {
            f"add_relu/{b}/{d}/{layout}" for b in ("triton", "cuda") for d in ("bf16", "fp16")
            for layout in ("channels_last", "nchw")
        }  # fmt: skip
        for backend in ("triton", "cuda"):
            resnet = next(f for f in fams if f.name == f"model/{backend}/resnet")
            assert ("conv_relu", "bf16/channels_last/k7x7/s2/nopool") in resnet.covers
            assert ("conv_relu", "bf16/channels_last/k1x1/residual/nopool") in resnet.covers
    else:
        # the rehearsal: fp16 only; the cuda families are listed (and skipped when run)
        assert sum(f.kind == "conv" for f in fams) == 2 * (4 + 7)
        assert {f.name for f in fams if f.op == "model"} == {
            "model/triton/bert-mlm", "model/triton/bert-mlm-unpad", "model/triton/vgg", "model/cuda/vgg",
            "model/triton/resnet", "model/cuda/resnet",
        }  # fmt: skip


@pytest.mark.parametrize("cpu", [False, True], ids=["device-run", "cpu-rehearsal"])
@pytest.mark.parametrize(("tail", "weight", "stride", "residual"), RESNET_FAMILIES, ids=[f[0] for f in RESNET_FAMILIES])
def test_resnet_conv_families_exist(cpu: bool, tail: str, weight: tuple, stride: int, residual: bool) -> None:
    """Each ResNet specialization has a conv_relu smoke family per backend and half type, named exactly like the
    family of the class ``verification.conv_class`` gives a call with that kernel, stride and residual."""
    fams = {f.name: f for f in smoke.families(cpu)}
    for dtype in ("fp16",) if cpu else ("bf16", "fp16"):
        cls = verification.conv_class(DTYPES[dtype], tail.startswith("channels_last"), weight, False, stride=stride,
                                      residual=residual)  # fmt: skip
        assert cls.rsplit("/", 1)[0] == f"{dtype}/{tail}"
        for backend in ("triton", "cuda"):
            fam = fams[f"conv_relu/{backend}/{dtype}/{tail}"]
            assert fam.family == f"{dtype}/{tail}" and fam.kind == "conv" and fam.backend == backend
            assert (fam.params["k"], fam.params["stride"], fam.params["residual"]) == (weight[2], stride, residual)


def _result_file(tmp: Path, op: str, case: dict, recs: list[dict], dtype: str = "bfloat16") -> None:
    data = {"op": op, "options": {"dtype": dtype}, "cases": [case], "results": recs}
    (tmp / f"{op}.json").write_text(json.dumps(data))


def _rec(case: str, provider: str, median: float, check: bool | None = True, mode: str = "fwd+bwd") -> dict:
    rec = {"case": case, "provider": provider, "mode": mode, "status": "ok",
           "timing": {"median_ms": median, "p20_ms": median * 0.95, "p80_ms": median * 1.05}}  # fmt: skip
    if check is not None:
        rec["check"] = {"against": provider.split("[")[0] + "[torch]", "passed": check}
    return rec


def test_bench_rows_and_the_record_they_make(tmp_path: Path) -> None:
    bert = {"name": "bert B32 L512 p0.1", "params": {"B": 32, "H": 12, "L": 512, "D": 64, "causal": False,
            "dropout": 0.1, "padded": True, "lengths": [500, 130, 300]}}  # fmt: skip
    _result_file(tmp_path, "attention", bert, [
        _rec(bert["name"], "ptfast[torch]", 10.0, None), _rec(bert["name"], "ptfast[triton]", 4.0),
        _rec(bert["name"], "ptfast[triton]", 1.0, mode="fwd"),
        _rec(bert["name"], "ptfast-varlen[torch]", 8.0, None), _rec(bert["name"], "ptfast-varlen[triton]", 9.0),
        _rec(bert["name"], "sdpa[efficient]", 5.0, None),
        _rec(bert["name"], "ptfast[triton,atomic-dq]", 3.0),
    ])  # fmt: skip
    mlm = {"name": "bert-base 32k tok", "params": {"E": 768, "V": 30522}}
    _result_file(tmp_path, "masked_lm_loss", mlm, [
        _rec(mlm["name"], "ptfast[torch]", 6.0, None), _rec(mlm["name"], "ptfast[triton]", 2.0, check=False),
    ])  # fmt: skip
    rows = {(r["op"], r["backend"], r["shape_class"]): r for r in headline.bench_rows(tmp_path, "sm90")}
    assert set(rows) == {
        ("attention", "triton", "bf16/d64/dropout+key_mask/L512"),
        ("attention_varlen", "triton", "bf16/d64/dropout+varlen/L512"),
        ("masked_lm_loss", "triton", "bf16/E1024"),
    }  # the atomic-dQ variant and the baselines are not ptfast backends of their own
    padded = rows[("attention", "triton", "bf16/d64/dropout+key_mask/L512")]
    assert padded["speedup"] == pytest.approx(2.5) and padded["checked"]
    assert padded["spread"][0] < 2.5 < padded["spread"][1]
    assert rows[("attention_varlen", "triton", "bf16/d64/dropout+varlen/L512")]["speedup"] < 1
    assert not rows[("masked_lm_loss", "triton", "bf16/E1024")]["checked"]
    passed = (("attention", "bf16/d64/dropout+key_mask"), ("attention_varlen", "bf16/d64/dropout+varlen"),
              ("masked_lm_loss", "bf16"))  # fmt: skip
    smoke_rows = [{"gpu_class": "sm90", "op": op, "backend": "triton", "family": fam, "passed": True}
                  for op, fam in passed]  # fmt: skip
    record = verification.build(smoke_rows, list(rows.values()), "r", {"device": "NVIDIA H200"})
    verdicts = {(e.op, e.shape_class): e.verdict() for e in record.entries}
    assert verdicts[("attention", "bf16/d64/dropout+key_mask/L512")] is None
    assert "slower" in verdicts[("attention_varlen", "bf16/d64/dropout+varlen/L512")]
    assert "did not match" in verdicts[("masked_lm_loss", "bf16/E1024")]


def test_conv_bench_rows_carry_kernel_stride_and_residual(tmp_path: Path) -> None:
    """A ResNet conv row's class has its kernel, stride and residual; a VGG row written before the ResNet cases
    (no stride / residual parameters) keeps its k3x3 class."""
    stem = {"name": "resnet50 stem 3->64 k7 s2 @224", "params": {"N": 64, "Cin": 3, "Cout": 64, "H": 224, "W": 224,
            "k": 7, "padding": 3, "stride": 2, "residual": False}}  # fmt: skip
    tail = {"name": "resnet18 layer3.1.conv2 256->256 k3 @14 +residual", "params": {"N": 64, "Cin": 256,
            "Cout": 256, "H": 14, "W": 14, "k": 3, "padding": 1, "stride": 1, "residual": True}}  # fmt: skip
    old = {"name": "conv4_2 512->512 @28", "params": {"N": 64, "Cin": 512, "Cout": 512, "H": 28, "W": 28, "k": 3,
           "padding": 1}}  # fmt: skip
    recs = [_rec(c["name"], p, m, None if p.endswith("[torch]") else True)
            for c in (stem, tail, old) for p, m in (("ptfast[torch]", 2.0), ("ptfast[cuda]", 1.0))]  # fmt: skip
    data = {"op": "conv_relu", "options": {"dtype": "bfloat16"}, "cases": [stem, tail, old], "results": recs}
    (tmp_path / "conv_relu.json").write_text(json.dumps(data))
    rows = {r["case"]: r["shape_class"] for r in headline.bench_rows(tmp_path, "sm90")}
    assert rows == {
        stem["name"]: "bf16/channels_last/k7x7/s2/nopool/cout64",
        tail["name"]: "bf16/channels_last/k3x3/residual/nopool/cout256",
        old["name"]: "bf16/channels_last/k3x3/nopool/cout512",
    }
    assert rows[stem["name"]] == verification.conv_class(torch.bfloat16, True, (64, 3, 7, 7), False, stride=2)
    families = {(f.op, f.backend, f.family) for f in smoke.families(cpu=False)}
    for cls in rows.values():
        assert ("conv_relu", "cuda", cls.rsplit("/", 1)[0]) in families, cls


def test_headline_classes_have_smoke_families(tmp_path: Path) -> None:
    families = {(f.op, f.backend, f.family) for f in smoke.families(cpu=False)}
    # The GPU headline's shapes, as the benchmark specs define them, map onto smoke-tested families.
    expected = [
        ("attention", "triton", "bf16/d64/dropout+key_mask"),
        ("attention_varlen", "triton", "bf16/d64/dropout+varlen"),
        ("masked_lm_loss", "triton", "bf16"),
        ("conv_relu_pool", "triton", "bf16/channels_last/k3x3/pool"),
        ("conv_relu_pool", "cuda", "bf16/channels_last/k3x3/pool"),
        ("conv_relu", "triton", "bf16/channels_last/k3x3/nopool"),
        ("conv_relu", "cuda", "bf16/channels_last/k3x3/nopool"),
    ]
    resnet_tails = ["k7x7/s2", "k3x3/s2", "k3x3/residual", "k1x1", "k1x1/s2", "k1x1/residual"]
    expected += [("conv_relu", backend, f"bf16/channels_last/{tail}/nopool")
                 for backend in ("triton", "cuda") for tail in resnet_tails]  # fmt: skip
    for key in expected:
        assert key in families, key
    ops = [inv.op for inv in headline.plan(cpu=False)]
    assert ops == ["attention", "masked_lm_loss", "conv_relu_pool", "conv_relu", "add_relu", "bert_mlm_step",
                   "vgg16_train_step", "resnet50_frozen_step", "resnet18_train_step"]  # fmt: skip
    assert [inv.op for inv in headline.plan(cpu=True)] == ops
    # every invocation names cases and providers its spec really has (a typo would silently measure nothing)
    from benchmarks.common import Options
    from benchmarks.ops import load

    for cpu in (False, True):
        # The GPU plan names the CUDA shapes (a device object only: nothing runs on it).
        opts = Options(device=torch.device("cpu" if cpu else "cuda"), quick=cpu)
        smoke_families = {(f.op, f.backend, f.family) for f in smoke.families(cpu)}
        dtype = torch.float16 if cpu else torch.bfloat16
        for inv in headline.plan(cpu):
            spec = load(inv.op)
            cases = {c.name: c for c in spec.cases(opts)}
            providers = {p.name for p in spec.providers(opts)}
            assert set(inv.cases) <= set(cases), (inv.op, set(inv.cases) - set(cases))
            assert set(inv.providers) <= providers, (inv.op, set(inv.providers) - providers)
            if inv.op == "add_relu":
                # every add_relu class the headline measures has a smoke family per backend
                for name in inv.cases:
                    for backend in ("triton", "cuda"):
                        op, cls = headline._shape_class(inv.op, f"ptfast[{backend}]", cases[name].params, dtype)
                        assert (op, backend, cls.rsplit("/", 1)[0]) in smoke_families, (cpu, name, backend, cls)
                if not cpu:
                    classes = {headline._shape_class(inv.op, "ptfast[cuda]", cases[n].params, dtype)[1]
                               for n in inv.cases}  # fmt: skip
                    assert classes == {"bf16/channels_last/n64M", "bf16/channels_last/n8M"}, classes
            if inv.op not in ("conv_relu", "conv_relu_pool"):
                continue
            # every conv class the headline measures (as bench_rows names it) has a smoke family per backend
            classes = set()
            for name in inv.cases:
                for backend in ("triton", "cuda"):
                    op, cls = headline._shape_class(inv.op, f"ptfast[{backend}]", cases[name].params, dtype)
                    assert (op, backend, cls.rsplit("/", 1)[0]) in smoke_families, (cpu, name, backend, cls)
                    classes.add(cls)
            if inv.op == "conv_relu":
                # a VGG layer plus the six ResNet layers, each a class of its own
                assert len(inv.cases) == 7 and len(classes) == 7, classes
                if not cpu:
                    assert classes == {
                        "bf16/channels_last/k3x3/nopool/cout512", "bf16/channels_last/k7x7/s2/nopool/cout64",
                        "bf16/channels_last/k1x1/nopool/cout64", "bf16/channels_last/k1x1/residual/nopool/cout256",
                        "bf16/channels_last/k3x3/s2/nopool/cout128", "bf16/channels_last/k3x3/residual/nopool/cout256",
                        "bf16/channels_last/k1x1/s2/nopool/cout1024",
                    }  # fmt: skip


def test_durations_from_junit() -> None:
    xml = (
        '<testsuite><testcase classname="tests.test_gpu_faults" name="test_auto_without_a_record_runs_torch" '
        'time="1.250" /><testcase classname="tests.test_gpu_conv_backends" name="test_x[2-3-bf16-triton]" '
        'time="0.031"><skipped /></testcase></testsuite>'
    )
    got = tier.durations_from_junit(xml)
    assert got == {
        "tests/test_gpu_faults.py::test_auto_without_a_record_runs_torch": 1.25,
        "tests/test_gpu_conv_backends.py::test_x[2-3-bf16-triton]": 0.031,
    }
    assert tier.slice_args("conv-bf16")[0] == "tests/test_gpu_conv_backends.py"
    with pytest.raises(KeyError, match="no GPU test slice"):
        tier.slice_args("nope")


def test_headline_budget() -> None:
    """The headline gets a budget (what the first-contact command has left): invocations run in plan order, the
    last ones get their --time-limit cut, and one that would not get half of its share is not started."""
    plan = headline.plan(cpu=False)
    # PTFAST_HEADLINE_TIMEOUT's default (scripts/gpu_run.sh) holds every --time-limit plus ~10 s of start-up each.
    assert sum(inv.seconds for inv in plan) + 10 * len(plan) <= 390
    inv = plan[-1]
    assert headline.limits(inv, None) == (inv.seconds, inv.seconds + 90.0)
    assert headline.limits(inv, 1000.0) == (inv.seconds, inv.seconds + 90.0)
    cut = headline.limits(inv, headline.START_UP_S + inv.seconds * 0.75)
    assert cut is not None and inv.seconds / 2 <= cut[0] < inv.seconds and cut[1] < inv.seconds + 90
    assert headline.limits(inv, headline.START_UP_S + inv.seconds / 2 - 1) is None
    cmd = headline.command(inv, cpu=False, out_dir=Path("/tmp/x"), python="python", seconds=7)
    assert cmd[cmd.index("--time-limit") + 1] == "7"


@pytest.mark.parametrize("name", [s.name for s in tier.SLICES])
def test_tier_slice_runs_only_its_own_files(name: str) -> None:
    """``gpu_run.sh tests-slice`` calls ``tests/run.py --gpu -m gpu ARGS``: the files of the slice must replace
    the default root (on the first GPU run, a slice collected the whole GPU tier and ran out of time)."""
    from tests import run

    args = tier.slice_args(name)
    runs = run.plan(["--gpu", "-m", "gpu", *args, "--junitxml=/tmp/x.xml"])
    assert len(runs) == 1
    _, pytest_args, interpreter = runs[0]
    files = [a for a in args if a.startswith("tests/")]
    assert not interpreter and "tests" not in pytest_args
    assert [a for a in pytest_args if a.startswith("tests")] == files


def test_run_script_defaults_and_interpreter_targets() -> None:
    from tests import run

    main, interp = run.plan([])
    assert main[1][-1] == "tests" and not main[2]
    assert interp[1][-1].endswith("interpreter") and interp[2]
    runs = run.plan(["tests/interpreter/test_triton_add_relu.py::test_x", "-k", "tests/test_conv.py", "-x"])
    assert [(args[2:], interp) for _, args, interp in runs] == [
        (["tests/interpreter/test_triton_add_relu.py::test_x", "-k", "tests/test_conv.py", "-x"], True)
    ]
    assert [r[1][-1] for r in run.plan(["--gpu"])] == ["tests"]


def test_backend_check_uses_the_ops_gradient_bound() -> None:
    """The pooled conv's gradient check allows bf16 argmax ties decided differently (3.7% measured on an H200
    between two correct kernels) and still fails a misplaced gradient (~141%)."""
    from benchmarks import run
    from benchmarks.ops import load

    spec = load("conv_relu_pool")
    bound = spec.grads_check_tol[torch.bfloat16]
    assert 0.037 < bound < 0.5 and not load("conv_relu").grads_check_tol
    ref = torch.ones(1000)
    moved = ref.clone()
    moved[0], moved[1] = 0.0, 2.0  # one window's gradient on its neighbour's pixel: 4.5% of the norm
    wrong = torch.randn(1000, generator=torch.Generator().manual_seed(3))  # every gradient elsewhere
    outputs = {f"ptfast[torch]{run.GRADS}": ref, f"ptfast[triton]{run.GRADS}": moved, f"ptfast[cuda]{run.GRADS}": wrong,
               "ptfast[torch]": ref, "ptfast[triton]": moved}  # fmt: skip
    recs = [{"provider": p, "status": "ok", "mode": "fwd+bwd"} for p in ("ptfast[triton]", "ptfast[cuda]")]
    recs.append({"provider": "ptfast[triton]", "status": "ok", "mode": "fwd"})
    run._check(recs, outputs, 3e-2, bound)
    triton_grads, cuda_grads, triton_out = (r["check"] for r in recs)
    assert 3e-2 < triton_grads["rel_err"] < bound and triton_grads["passed"] and triton_grads["tol"] == bound
    assert cuda_grads["rel_err"] > 1.0 and not cuda_grads["passed"]
    assert triton_out["tol"] == 3e-2 and not triton_out["passed"]  # outputs keep the generic bound


def test_smoke_writes_what_it_verified_after_every_family(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A smoke step cut by its timeout must leave the rows it finished (the first H200 run took 183 of its 200 s):
    smoke.json is rewritten after every family, model-step failures expanded as at the end."""
    import subprocess

    from benchmarks.first_contact import __main__ as cli

    fams = smoke.families(cpu=True)[:3]
    model = next(f for f in smoke.families(cpu=True) if f.op == "model")
    monkeypatch.setattr(smoke, "families", lambda cpu: [*fams, model])
    monkeypatch.setattr(smoke, "_skip_reason", lambda fam, cpu: None)

    def fake_run(cmd, **kwargs):  # noqa: ANN001, ANN202 - the family's process "crashes" at once
        return subprocess.CompletedProcess(cmd, 3, "", "boom")

    monkeypatch.setattr(smoke.subprocess, "run", fake_run)
    out = tmp_path / "smoke.json"
    seen: list[int] = []
    real_write = cli._write_json

    def spy(path: str, rows: list) -> None:
        real_write(path, rows)
        seen.append(len(json.loads(Path(path).read_text())))

    monkeypatch.setattr(cli, "_write_json", spy)
    args = cli.argparse.Namespace(device="cpu", jobs=1, timeout=5.0, out=str(out))
    assert cli.cmd_smoke(args) == 1
    covered = len(model.covers)
    assert seen == [1, 2, 3, 4 + covered, 4 + covered]  # after each family, then the final write
    rows = json.loads(out.read_text())
    assert all(r["status"] == "failed" for r in rows) and not list(tmp_path.glob("*.tmp"))
