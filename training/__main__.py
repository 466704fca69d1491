"""``python -m training``: the training command line (``training.cli``)."""

import os
import sys

from training.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank under torchrun ends here, without the interpreter's and the C++ runtime's teardown: a thread
    # of PyTorch's process group can still be joinable when the C++ runtime destroys it, which aborts a
    # rank that has finished and written everything ("terminate called without an active exception",
    # exit -6), and torchrun then reports the whole run failed. Seen in CI runs of tests/test_distributed.py
    # even after the ranks leave the process group together (training/distributed.py). Everything the run
    # writes is closed by now; only the standard streams may hold output.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
