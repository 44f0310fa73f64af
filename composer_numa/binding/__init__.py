"""Acting on the machine: system calls, applying and verifying a binding, one binding session.

- :mod:`.linux`: every Linux call (affinity, memory policy, page migration), raw syscalls.
- :mod:`.apply`: apply a :class:`~composer_numa.plan.RankPlan` to the running process.
- :mod:`.verify`: read a binding back, compare it with a plan, the exported binding document.
- :mod:`.session`: :func:`~composer_numa.binding.session.bind_rank`, the one pipeline
  (rank -> machine -> plan -> warnings -> apply) that ``exec``, ``launch`` and the callback share.
- :mod:`.locality`: where a process's pages are (``numa_maps``).
- :mod:`.workers`: DataLoader worker processes on cores of their own.
"""
