"""nrexp's optimizers are torch's, less the import of torch._dynamo a run does not need (start-up time)."""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, cli_env
from nrexp.optim import make_optimizer

TORCH_CLASS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def optim_cfg(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, lr=0.05, momentum=0.9, betas=(0.9, 0.99))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_steps_and_state_are_torchs_own(name):
    """Same parameters after a few steps, bit for bit, as torch's class with the same arguments; each
    one's state_dict loads into the other."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    cfg = optim_cfg(name)
    ours = make_optimizer([{"params": list(model.parameters()), "weight_decay": 0.01}], cfg)
    extra = {"momentum": cfg.momentum} if name == "sgd" else {"betas": cfg.betas}
    theirs = TORCH_CLASS[name](
        [{"params": list(twin.parameters()), "weight_decay": 0.01}], lr=cfg.lr, fused=True, **extra
    )
    assert isinstance(ours, TORCH_CLASS[name]) and type(ours) is not TORCH_CLASS[name]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert str(ours.state_dict()) == str(theirs.state_dict())


@pytest.mark.slow
def test_a_run_imports_no_dynamo_unless_it_compiles(tmp_path):
    """Building, stepping, zeroing, saving and loading nrexp's optimizer leave torch._dynamo unimported
    (torch's wrappers import it on their first call, ~2 s of a 1-step run); once something imports it,
    torch's own wrappers take the calls again, with the same arithmetic."""
    script = """
import sys, torch, torch.nn.functional as F
from types import SimpleNamespace
from nrexp.optim import make_optimizer
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
opt = make_optimizer([{"params": list(model.parameters())}], SimpleNamespace(name="sgd", lr=0.1, momentum=0.9))
x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
step()
opt.load_state_dict(opt.state_dict())
print("dynamo", "torch._dynamo" in sys.modules)
import torch._dynamo
step()
print("steps", len(opt.state_dict()["state"]), model.weight.sum().item())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "dynamo False"
    assert lines[1].startswith("steps 2 ")
    assert str(REPO) in cli_env(tmp_path)["PYTHONPATH"]
