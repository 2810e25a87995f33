"""Exit codes, and the guard that turns every exception of a command into one line and exit 2.

Exit codes: 0 passed, 1 a finding at or above --fail-on that is neither ignored nor baselined,
2 usage/input/internal error, 3 nothing to audit. An unhandled exception never exits 1.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

from bnaudit.cli.streams import error
from bnaudit.core.errors import BnauditError

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_NOTHING = 0, 1, 2, 3


def guard(action: Callable[[], int], debug: bool) -> int:
    """Run `action`; every exception becomes a one-line message and exit 2."""
    try:
        return action()
    except BnauditError as exc:
        if debug:
            traceback.print_exc()
        error(f"bnaudit: error: {exc}")
    except KeyboardInterrupt:
        error("bnaudit: interrupted")
    except Exception as exc:
        if debug:
            traceback.print_exc()
        error(
            f"bnaudit: internal error: {type(exc).__name__}: {exc}; rerun with --debug "
            "for the traceback"
        )
    return EXIT_ERROR
