"""How the CPU threads of torch's OpenMP pool wait; imported by every script before torch.

GNU OpenMP (the runtime the torch wheels use on Linux) lets a thread that has finished its share
of a parallel region spin for a while before it sleeps, 300,000 turns by default. On a machine to
itself that saves a wake-up; on a busy one the spinning threads take the cores the other
process's threads are waiting for, and both crawl: a pre-training measured at 611 img/s alone ran
below 70 img/s beside the test suite (docs/performance.md, "A busy machine"). A short spin,
``GOMP_SPINCOUNT=10000``, kept 96-98 % of the quiet speed and ran at 233 img/s beside the suite.

Only a default: an ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the user set is left alone. It acts
when the OpenMP runtime starts, so this module must be imported before torch (and numpy, which
may load the same runtime).
"""
import os

SPIN_COUNT = "10000"

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
