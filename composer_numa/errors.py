"""Exceptions raised by composer-numa.

Every error a user can cause carries a one-line message naming what was wrong;
the CLI prints that line and exits non-zero instead of showing a traceback.
"""

__all__ = ["ComposerNumaError", "TopologyError", "PlanError", "BindError"]


class ComposerNumaError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class TopologyError(ComposerNumaError):
    """The sysfs/procfs tree could not be read as a machine description."""


class PlanError(ComposerNumaError):
    """The requested plan is impossible or its options are invalid."""


class BindError(ComposerNumaError):
    """A binding could not be applied and ``strict`` asked for an error."""
