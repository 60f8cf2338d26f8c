"""Two costs of a visiontune process that are not the model's arithmetic, each against glibc's and
Python's own behaviour in the same script on this machine:

1. Training steps with glibc's default allocator (it unmaps freed blocks above its mmap threshold, at most
   32 MiB, and faults them in again, zeroed, on the next step) against memory.reuse_freed_memory (freed
   blocks up to 1 GiB are reused). The default backbone with the default --freeze of AdamW's recipe (pretrained
   BatchNorm statistics), batch 32 at 160 px,
   channels-last, AdamW: 2 warm-up steps, then 8 timed, in a fresh process per variant, interleaved 3
   times; glibc's default is had by setting GLIBC_TUNABLES (reuse_freed_memory leaves a process whose
   user set glibc's malloc variables alone). Target: the median step with reuse <= 0.95x glibc's default.
2. The end of a command: from its last line of output to the process's exit, for `visiontune models` after
   importing what `visiontune train` imports, with Python's normal exit (sys.exit(main())) against
   cli.entry (atexit handlers, flushed streams, then os._exit). Interleaved 3 times. Target: entry's
   exit <= 0.25x the normal exit.

usage: python bench/process_overheads.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

STEPS_CHILD = r"""
import json, resource, time
import torch
from visiontune.backbones import build_classifier
from visiontune.config import DEFAULT_BACKBONE, FREEZE_FINEST_REDUCTION
from visiontune.memory import reuse_freed_memory
from visiontune.recipes import high_resolution_groups, leading_group_parameters

applied = reuse_freed_memory()
torch.manual_seed(0)
model, _ = build_classifier(DEFAULT_BACKBONE, 10, None)
model = model.to(memory_format=torch.channels_last).train()
count, _ = high_resolution_groups(model, FREEZE_FINEST_REDUCTION["frozen"])  # AdamW's: statistics kept
for p in leading_group_parameters(model, count):
    p.requires_grad_(False)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
images = torch.randn(32, 3, 160, 160).contiguous(memory_format=torch.channels_last)
labels = torch.randint(0, 10, (32,))

def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()

step(); step()
usage = resource.getrusage(resource.RUSAGE_SELF)
seconds = []
for _ in range(8):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "step_s": sorted(seconds)[len(seconds) // 2],
                  "sys_s": after.ru_stime - usage.ru_stime, "faults": after.ru_minflt - usage.ru_minflt,
                  "max_rss_gb": after.ru_maxrss / (1 << 20)}))
"""

def steps(reuse: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if not reuse:
        env["GLIBC_TUNABLES"] = ""
    out = subprocess.run([sys.executable, "-c", STEPS_CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def exit_seconds(variant: str) -> float:
    """Seconds from the child's last line of output to its exit."""
    call = "entry()" if variant == "entry" else "sys.exit(main())"
    code = ("import sys; import visiontune.training; from visiontune.cli import entry, main; "
            f"sys.argv = ['visiontune', 'models']; {call}")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    last = time.perf_counter()
    for _ in process.stdout:
        last = time.perf_counter()
    process.wait()
    if process.returncode != 0:
        raise SystemExit(f"{variant}: exit code {process.returncode}")
    return time.perf_counter() - last


def main() -> int:
    runs = {"glibc default": [], "reuse": []}
    exits = {"sys.exit(main())": [], "entry()": []}
    for _ in range(3):
        runs["glibc default"].append(steps(reuse=False))
        runs["reuse"].append(steps(reuse=True))
        exits["sys.exit(main())"].append(exit_seconds("normal"))
        exits["entry()"].append(exit_seconds("entry"))
    assert not any(r["applied"] for r in runs["glibc default"]) and all(r["applied"] for r in runs["reuse"])
    print("training step (efficientnet_lite0, --freeze 3, batch 32, 160 px, channels-last), 3 fresh processes each:")
    for name, rows in runs.items():
        print(f"  {name:14} median step {[round(r['step_s'], 3) for r in rows]} s, sys over 8 steps "
              f"{[round(r['sys_s'], 2) for r in rows]} s, page faults {[r['faults'] for r in rows]}, "
              f"peak RSS {max(r['max_rss_gb'] for r in rows):.2f} GB")
    default_step = statistics.median(r["step_s"] for r in runs["glibc default"])
    reuse_step = statistics.median(r["step_s"] for r in runs["reuse"])
    print("end of a command (last output line to exit, after importing what train imports), 3 each:")
    for name, values in exits.items():
        print(f"  {name:16} {[round(v, 2) for v in values]} s")
    normal_exit = statistics.median(exits["sys.exit(main())"])
    fast_exit = statistics.median(exits["entry()"])
    results = [
        ("training step with reuse <= 0.95x glibc's default", f"{reuse_step:.3f}s / {default_step:.3f}s = "
         f"{reuse_step / default_step:.2f}x", reuse_step <= 0.95 * default_step),
        ("command exit through entry() <= 0.25x Python's normal exit", f"{fast_exit:.2f}s / {normal_exit:.2f}s = "
         f"{fast_exit / normal_exit:.2f}x", fast_exit <= 0.25 * normal_exit),
    ]
    for target, measured, ok in results:
        print(f"{target}: {measured} {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
