"""FarMesh core: the node, the client and the plugin machinery they share."""

import os
import sys

__version__ = "0.1.0"

# GNU OpenMP's workers (torch's CPU threads) spin about 3 ms after a parallel region before they
# sleep. A one-token step makes one parallel region per matmul (row_matmul.row_blocks) with gaps of
# tens of microseconds, and on a machine that runs a chain of nodes (or a client beside its nodes), a
# process spinning after its step takes a core from the next one. About 50 us covers the gaps and
# gives the core back: 2 nodes on 2 cores, 6.5 against 10.7 ms per token with the default. OpenMP
# reads it once, when torch loads, so here, before anything of FarMesh imports torch; a process
# that imported torch first keeps the default (FarNode logs a warning) and an explicit setting wins.
OPENMP_SPIN_SET = "torch" not in sys.modules or "GOMP_SPINCOUNT" in os.environ
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "5000")
