"""The stages, one module each, and ``distill``'s command line (:mod:`stages.cli`).

Importing the package (before torch) makes OpenMP's idle threads sleep rather than spin, unless the environment
already says how they wait (``OMP_WAIT_POLICY``, or libgomp's ``GOMP_SPINCOUNT``). On a machine where another
process holds a core, spinning threads wait on a peer that is not running: a ResNet-18 training step on 2 cores
beside one busy thread ran at 38 im/s spinning and 266 im/s sleeping (the same step on an idle machine: about 20 %
slower sleeping). The results do not change, only how threads wait.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
