"""ce_pretrain.host_memory: freed host memory is kept for reuse on glibc, so large CPU tensors stop page-faulting.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting exists only on glibc (Linux); elsewhere it is a no-op")

PROBE = textwrap.dedent("""
    import resource, sys, threading
    import torch
    from ce_pretrain.host_memory import retain_freed_memory

    applied = retain_freed_memory() if sys.argv[1] == "keep" else False
    n = 32 * 2**20  # 128 MB of float32: above glibc's largest mmap threshold (32 MB)
    torch.ones(n), torch.ones(n)  # warm-up: the heap grows to its working size once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(n)  # allocated, filled, freed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    sums = []
    worker = threading.Thread(target=lambda: sums.append(float(torch.ones(2 * n).sum())))  # 256 MB off the main thread
    worker.start()
    worker.join()
    print(applied, faults, sums[0] == 2 * n)
""")


def _probe(mode: str, **env: str) -> tuple[str, int, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=environ)
    applied, faults, thread_ok = out.stdout.split()
    return applied, int(faults), thread_ok


def test_kept_memory_stops_page_faults_and_large_blocks_still_allocate_off_the_main_thread():
    applied, released_faults, thread_ok = _probe("system")
    if released_faults < 5_000:
        pytest.skip(f"this kernel maps fresh memory in huge pages ({released_faults} faults for 640 MB): "
                    "nothing to compare")
    assert (applied, thread_ok) == ("False", "True")
    applied, kept_faults, thread_ok = _probe("keep")
    assert (applied, thread_ok) == ("True", "True")  # a 256 MB block in a thread's arena falls back to mmap
    assert kept_faults < released_faults / 20, (kept_faults, released_faults)


@pytest.mark.parametrize("env", [{"CE_PRETRAIN_HOST_MEMORY": "release"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"MALLOC_MMAP_MAX_": "65536"}])
def test_the_users_choice_wins(env):
    applied, _, _ = _probe("keep", **env)
    assert applied == "False"


def test_cpu_training_turns_it_on(tmp_path):
    """The pretraining engine applies it when its accelerator runs on the CPU."""
    script = textwrap.dedent(f"""
        from ce_pretrain import host_memory
        from ce_pretrain.config import TrainConfig
        from ce_pretrain.engine import make_accelerator
        assert not host_memory._applied
        make_accelerator(TrainConfig(output_dir={str(tmp_path)!r}, cpu=True))
        print(host_memory._applied)
    """)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=environ)
    assert out.stdout.split()[-1] == "True"
