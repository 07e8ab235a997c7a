"""The GPU machine has torch 2.11 / torchvision 0.26, not the 2.14 pinned here.

Every torch call of the GPU script's code path that passes keywords (or a device) must be one that
torch 2.11 accepts: tests/data/torch211_signatures.json records those signatures, and the calls are
read from the source (AST). A keyword newer than 2.11 must go behind a check of the installed
signature instead (as DDP's buffer-sync keyword does: `ddp_buffer_kwargs`, tested below).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
SIGNATURES = json.loads((REPO / "tests" / "data" / "torch211_signatures.json").read_text())["signatures"]

#: calls that spread a dict (`**kwargs`) into a recorded API, which the AST cannot read: each has a
#: test or a reason
SPREAD_OK = {
    (
        "slidetrain/train/tilebag/distributed_executor.py",
        "torch.nn.parallel.DistributedDataParallel",
    ): "ddp_buffer_kwargs: test_ddp_buffer_keyword_is_one_torch_211_knows",
    (
        "slidetrain/data/tilebag.py",
        "torch.utils.data.DataLoader",
    ): "bag_loader: num_workers, collate_fn, sampler, shuffle, prefetch_factor, persistent_workers",
}
#: slidetrain.cli imports every command's module lazily; the GPU script uses only `distributed-parallel`,
#: whose module (slidetrain.bench.distributed_equivalence) is a root already
NOT_FOLLOWED = {"slidetrain.cli"}


def _file(module: str) -> Path | None:
    for path in (SRC / (module.replace(".", "/") + ".py"), SRC / module.replace(".", "/") / "__init__.py"):
        if path.exists():
            return path
    return None


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("slidetrain")}


def gpu_path_files() -> list[Path]:
    """The GPU script and every slidetrain module it (transitively) imports, lazily or not."""
    from slidetrain.bench.gpu import SECTIONS

    todo = ["slidetrain.bench.gpu", *(m for s in SECTIONS for m in s.modules if m.startswith("slidetrain"))]
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_FOLLOWED:
            continue
        path = _file(module)
        if path is None:  # `from package import name` of a function, not a module
            continue
        seen[module] = path
        todo += _imports(ast.parse(path.read_text()))
        todo += [module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)]  # its packages run too
    return sorted(set(seen.values()))


def _aliases(tree: ast.AST) -> dict[str, str]:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return head and f"{head}.{node.attr}"
    return None


def torch_calls(path: Path):
    """(line, full name, call node) of every call of a torch/torchvision name in `path`."""
    tree = ast.parse(path.read_text())
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := _dotted(node.func)):
            head, *rest = name.split(".")
            full = ".".join([aliases.get(head, head), *rest])
            if full.split(".")[0] in ("torch", "torchvision"):
                yield node.lineno, full, node


def _parameters(signature: str) -> ast.arguments:
    return ast.parse(f"def f{signature}: pass").body[0].args


def test_calls_on_the_gpu_path_fit_torch_211():
    problems, checked = [], set()
    for path in gpu_path_files():
        where = path.relative_to(SRC).as_posix()
        for line, name, call in torch_calls(path):
            if name not in SIGNATURES:
                if call.keywords:  # any keyword passed to torch must be checked against 2.11
                    problems.append(
                        f"{where}:{line}: {name} takes keywords; record its torch 2.11 "
                        "signature in tests/data/torch211_signatures.json"
                    )
                continue
            checked.add(name)
            params = _parameters(SIGNATURES[name])
            names = {a.arg for a in params.posonlyargs + params.args + params.kwonlyargs}
            for kw in call.keywords:
                if kw.arg is None:
                    if (where, name) not in SPREAD_OK:
                        problems.append(f"{where}:{line}: **kwargs into {name}: check them (SPREAD_OK)")
                elif kw.arg not in names and params.kwarg is None:
                    problems.append(
                        f"{where}:{line}: {name}(..., {kw.arg}=...): torch 2.11 has no such "
                        f"parameter {SIGNATURES[name]}"
                    )
            positional = [a for a in call.args if not isinstance(a, ast.Starred)]
            if params.vararg is None and len(positional) > len(params.posonlyargs + params.args):
                problems.append(
                    f"{where}:{line}: {name} given {len(positional)} positional arguments; "
                    f"torch 2.11 takes {SIGNATURES[name]}"
                )
    assert not problems, "\n".join(problems)
    # not vacuous: the calls that broke before, and the walk found the distributed executor
    assert {
        "torch.nn.parallel.DistributedDataParallel",
        "torch.distributed.init_process_group",
        "torch.cuda.set_per_process_memory_fraction",
        "torch.autocast",
    } <= checked


def test_a_keyword_newer_than_torch_211_fails_the_check():
    bad = ast.parse("DDP(module, forward_sync_buffers=False)").body[0].value
    params = _parameters(SIGNATURES["torch.nn.parallel.DistributedDataParallel"])
    assert "forward_sync_buffers" not in {a.arg for a in params.args + params.kwonlyargs}
    assert [kw.arg for kw in bad.keywords] == ["forward_sync_buffers"]


def test_every_recorded_name_exists_in_the_installed_torch():
    for name in SIGNATURES:
        module, _, attr = name.rpartition(".")
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError:  # a class attribute: torch.nn.SyncBatchNorm.convert_sync_batchnorm
            owner, _, cls = module.rpartition(".")
            obj = getattr(importlib.import_module(owner), cls)
        assert callable(getattr(obj, attr)), name


def test_ddp_buffer_keyword_is_one_torch_211_knows(monkeypatch):
    from slidetrain.train.tilebag import distributed_executor as distributed

    namespace: dict = {}
    exec(f"def __init__(self, {SIGNATURES['torch.nn.parallel.DistributedDataParallel'][1:]}: pass", namespace)
    torch_211_ddp = type("DistributedDataParallel", (), {"__init__": namespace["__init__"]})
    monkeypatch.setattr(distributed, "DDP", torch_211_ddp)
    assert distributed.ddp_buffer_kwargs(False) == {"broadcast_buffers": False}
    torch_211_ddp(object(), device_ids=None, process_group=None, **distributed.ddp_buffer_kwargs(True))
    monkeypatch.undo()
    # the installed torch (2.14 here) takes its own spelling, without the deprecation warning
    import inspect

    installed = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    assert set(distributed.ddp_buffer_kwargs(True)) <= set(installed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _syncbn_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: the gloo SyncBN under each differentiable all_reduce; its gradients to `out`."""
    import torch.distributed as dist

    from slidetrain.train.tilebag import distributed_executor as distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    available = distributed.differentiable_all_reduce_impl()
    try:
        for impl in ("funcol", "nn.functional"):
            if impl == "funcol" and available != "funcol":
                continue  # this torch has no autograd for funcol's all_reduce: only the fallback runs
            distributed.differentiable_all_reduce_impl = lambda impl=impl: impl  # test-only switch
            torch.manual_seed(0)
            x_all, weights = torch.randn(8, 3, 5, 5) * 2 + 1, torch.randn(8, 3, 5, 5)  # same on every rank
            layer = distributed._AllReduceSyncBatchNorm(torch.nn.BatchNorm2d(3), dist.group.WORLD)
            share = slice(rank * 8 // world, (rank + 1) * 8 // world)
            x = x_all[share].clone().requires_grad_()
            (layer(x) * weights[share]).sum().backward()
            torch.save({"x_grad": x.grad, "weight_grad": layer.weight.grad}, f"{out}/{impl}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def syncbn_grads(tmp_path_factory) -> Path:
    """Both implementations in one pair of gloo processes (a spawn costs seconds on CI's two cores)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_syncbn_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("impl", ["funcol", "nn.functional"])
def test_syncbn_gradients_under_each_differentiable_all_reduce(syncbn_grads, impl):
    """The gloo SyncBN's gradients equal BatchNorm's over the whole batch, with funcol's all_reduce
    (newer torch) and with torch.distributed.nn.functional's (the fallback torch 2.11 may need)."""
    from slidetrain.train.tilebag.distributed_executor import differentiable_all_reduce_impl

    if impl == "funcol" and differentiable_all_reduce_impl() != "funcol":
        pytest.skip("this torch has no autograd for funcol's all_reduce")
    torch.manual_seed(0)
    x_all, weights = torch.randn(8, 3, 5, 5) * 2 + 1, torch.randn(8, 3, 5, 5)
    x_all.requires_grad_()
    bn = torch.nn.BatchNorm2d(3)
    (bn(x_all) * weights).sum().backward()
    ranks = [torch.load(syncbn_grads / f"{impl}_{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x_all.grad, rtol=1e-4, atol=1e-5)
    # DDP sums the ranks' parameter gradients (then averages); their sum is the whole batch's
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], bn.weight.grad, rtol=1e-4, atol=1e-5)
