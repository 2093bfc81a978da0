"""mnist-attack: hostile clients against mnist-serve, each check judged against the server's contract.

`python -m loadtest.attack` (or `mnist-attack`) runs them; `cli.py` says how (its docstring is `--help`). One module
per family of checks, imported below in the order the checks run (the order of `CHECKS`):

- wire.py: group 5, malformed messages (shared server)
- nonsense.py: group 4, no confident nonsense (shared server)
- listen.py: group 3, where the metrics listen
- decode.py: group 1, decode budgets (fresh servers)
- clients.py: group 3, idle and slow clients (fresh servers)
- overload.py: group 2, admission control (fresh server)
- shutdown.py: group 6, shutdown (fresh server)

What they share: core.py (report lines, Skip/Fail, the @check registry), context.py (the servers, `Ctx`),
client.py (calls from this process, /metrics, probes), measure.py (the server's RSS and CPU), load.py (load from
spawned processes), craft.py (the crafted images); runner.py runs the checks and writes the report.
"""

# Each family registers its checks in CHECKS as it is imported: this order is the order they run and are listed.
from loadtest.attack import (  # noqa: I001, F401
    wire,
    nonsense,
    listen,
    decode,
    clients,
    overload,
    shutdown,
)
from loadtest.attack.cli import main
from loadtest.attack.core import CHECKS
from loadtest.attack.runner import select

__all__ = ["CHECKS", "main", "select"]
