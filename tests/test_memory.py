"""memory.reuse_freed_memory: a training step's large blocks are reused, not faulted in from the kernel
each time; release_freed_memory still shrinks the resident set between phases."""

import json
import os
import subprocess
import sys

import pytest

# A few training steps of a small conv net on a 16 MiB batch (its activations and gradients are 32-64 MiB
# blocks, as a real step's are), counting the pages the kernel faults in after two warm-up steps; then
# everything is freed and the resident set is read before and after release_freed_memory.
PROBE = r"""
import json, resource
import torch
from visiontune.memory import release_freed_memory, reuse_freed_memory

applied = reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / (1 << 20)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 16, 3, padding=1))
batch = torch.randn(16, 16, 128, 128)
def step():
    net.zero_grad(set_to_none=True)
    net(batch).square().mean().backward()
step(); step()
before = faults()
for _ in range(6):
    step()
step_faults = faults() - before
del net, batch
rss_kept = rss_mib()
release_freed_memory()
print(json.dumps({"applied": applied, "faults": step_faults, "rss_kept": rss_kept, "rss_released": rss_mib()}))
"""


def _probe(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_are_reused_and_released_between_phases():
    reused = _probe()
    # The user's own glibc settings are left alone: this is glibc's default behaviour.
    default = _probe(GLIBC_TUNABLES="")
    assert reused["applied"] is True and default["applied"] is False
    step_mib = 64  # one of the step's largest blocks
    # glibc's default maps each large block afresh and unmaps it when freed: its pages fault in every step.
    assert default["faults"] * 4096 > 6 * step_mib * (1 << 20), default
    # Reused: the warm-up steps' pages serve the later steps (a few blocks may still grow the heap).
    assert reused["faults"] * 4 < default["faults"], (reused, default)
    # Kept for reuse while the phase runs, handed back when it ends.
    assert reused["rss_kept"] - reused["rss_released"] > step_mib, reused
