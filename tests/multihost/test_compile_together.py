"""`distributed.compile_together` on a real two-process job: a process that compiles 35 s later than the
other must not break the first run of a program.

gloo (JAX's CPU collectives) gives processes 30 s to meet when a program first connects a group of devices;
without the barrier, process 0 would run the program at once and fail with "Gloo context initialization
failed: DEADLINE_EXCEEDED" while process 1 is still "compiling".
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.multihost.conftest import REPO, env, free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LATE_S = 35  # longer than gloo's 30 s

PROGRAM = r"""
import logging, sys, time
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from musenet_jax import distributed

process, port, late_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.full((2,), process + 1.0, np.float32),
                                           (4,))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
if process == 1:
    time.sleep(late_s)  # a slow compiler: a busy host, or a compilation cache miss where process 0 hit
logging.basicConfig(level=logging.WARNING)
with jax.log_compiles():
    distributed.compile_together("sum", total, x)
    print(f"process {process}: sum {float(total(x))}", flush=True)
"""


def test_a_process_compiling_late_does_not_break_the_first_run():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PROGRAM, str(p), str(port), str(LATE_S)], cwd=REPO,
                              env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    outputs = [p.communicate(timeout=LATE_S + 240)[0] for p in procs]
    for p, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, out[-3000:]
        assert f"process {p}: sum 6.0" in out, out[-3000:]
        # The real call ran the program compiled before the barrier: no second compilation.
        assert out.count("Compiling jit(<lambda>)") == 1, out[-3000:]
