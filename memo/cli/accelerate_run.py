"""``python -m memo.cli.accelerate_run ARGS``: ``accelerate launch ARGS`` that exits with the job's code.

See NOTE [ The job's exit code ] in memo/cli/launch.py: Accelerate exits 1 whatever code a rank
exited with; this runs Accelerate's own ``main()`` and exits with the first failed rank's code
instead (128 + N for a rank killed by signal N). ``memo launch`` runs it; nothing else changes.
"""

from __future__ import annotations

import subprocess
import sys


def exit_code(error: BaseException) -> int | None:
    """The failed rank's exit code carried by ``error``, or None when it carries none."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    if isinstance(error, ChildFailedError):
        code = error.get_first_failure()[1].exitcode
    elif isinstance(error, subprocess.CalledProcessError):
        code = error.returncode
    else:
        return None
    if code < 0:
        return 128 - code   # killed by signal -code, as a shell reports it
    return code or 1


def main() -> int:
    from accelerate.commands.launch import main as accelerate_main
    sys.argv[0] = "accelerate launch"
    try:
        accelerate_main()
    except Exception as e:   # Accelerate's failures carry the rank's code; anything else propagates
        code = exit_code(e)
        if code is None:
            raise
        sys.stderr.write(f"memo launch: the job failed; exit code {code} (the first failed rank's)\n")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
