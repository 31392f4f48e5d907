"""What every script sets before its heavy imports (torch, matplotlib): imported first.

**How the CPU threads of torch's OpenMP pool wait.** GNU OpenMP (the runtime the torch wheels
use on Linux) lets a thread that has finished its share of a parallel region spin for a while
before it sleeps, 300,000 turns by default. On a machine to
itself that saves a wake-up; on a busy one the spinning threads take the cores the other
process's threads are waiting for, and both crawl: a pre-training measured at 611 img/s alone ran
below 70 img/s beside the test suite (docs/performance.md, "A busy machine"). A short spin,
``GOMP_SPINCOUNT=10000``, kept 96-98 % of the quiet speed and ran at 233 img/s beside the suite.

Only a default: an ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the user set is left alone. It acts
when the OpenMP runtime starts, so this module must be imported before torch (and numpy, which
may load the same runtime).

**Ctrl-C while starting.** Importing torch takes seconds; an interrupt then would end in a
traceback through the import machinery. Until the script's ``main`` runs (:func:`utils.run_cli`
puts Python's own handler back), Ctrl-C ends it with one line and status 130; nothing has been
read or written yet. A SIGINT the caller set to be ignored (a job started in the background)
stays ignored.
"""
import os
import signal
import sys

SPIN_COUNT = "10000"

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def _interrupted_while_starting(signum, frame) -> None:
    sys.stderr.write(f"{os.path.basename(sys.argv[0]) or 'python'}: interrupted while starting; nothing was "
                     "read or written\n")
    sys.stderr.flush()
    os._exit(130)


_interrupted_while_starting.while_starting = True  # utils.run_cli recognises it by this mark

if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
