"""available_memory() respects the address-space and data limits (ulimit -v,
RLIMIT_AS; ulimit -d, RLIMIT_DATA): under either a large allocation fails
however much RAM is free.  Each case runs in a child process, which sets its
own limit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

resource = pytest.importorskip("resource")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="RLIMIT_AS, RLIMIT_DATA and /proc/self/status: Linux")
LIMITS = {"RLIMIT_AS": "VmSize", "RLIMIT_DATA": "VmData"}

HEADROOM = 300 * 2**20
PLENTY = 2**50  # the host's available memory in the child: far above any limit

# The child fixes the host's and the cgroup's figures (they move between two
# readings), measures what the limit counts after its imports (numpy's and
# torch's reserve much address space), then limits itself to that plus
# HEADROOM (or not at all) and reports what available_memory() says, and
# whether an array of half that fits and one beyond it does not.
CHILD = """
import json, os, resource, sys
import numpy as np
from tsalgebra import problem
headroom, name, counted = int(sys.argv[1]), sys.argv[3], sys.argv[4]
problem._host_memory = lambda: int(sys.argv[2])
problem.cgroup_memory = lambda root=None: None
with open("/proc/self/status") as fh:
    used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith(counted + ":"))
if headroom >= 0:
    limit = getattr(resource, name)
    resource.setrlimit(limit, (used + headroom, resource.getrlimit(limit)[1]))
got = problem.available_memory()
fits = beyond = None
if 0 <= got <= 2 * headroom:  # (an estimate beyond the limit is reported, not allocated)
    fits = int(np.ones(got // 2, dtype=np.uint8).sum()) == got // 2
    try:
        np.ones(got + 64 * 2**20, dtype=np.uint8)
        beyond = True
    except MemoryError:
        beyond = False
print(json.dumps({"available": got, "fits": fits, "beyond": beyond}))
"""


def child(headroom: int, name: str = "RLIMIT_AS") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(headroom), str(PLENTY), name, LIMITS[name]],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_a_memory_limit_bounds_available_memory(name):
    hard = resource.getrlimit(getattr(resource, name))[1]
    if hard != resource.RLIM_INFINITY:
        pytest.skip(f"a hard {name} ({hard} bytes) is set here")
    got = child(HEADROOM, name)
    # the limit less what it counts: less than the headroom by what the child mapped after measuring
    assert HEADROOM // 2 < got["available"] <= HEADROOM
    assert got["fits"] and got["beyond"] is False  # the estimate is what an allocation finds


def test_without_a_limit_nothing_changes():
    if any(resource.getrlimit(getattr(resource, name))[0] != resource.RLIM_INFINITY for name in LIMITS):
        pytest.skip("a memory limit is set here")
    assert child(-1)["available"] == PLENTY
