"""Reading the machine: the only code that opens sysfs, procfs and cgroup files.

- :mod:`.topology`: the immutable machine model (nodes, CPUs, GPUs, NICs, cpuset, capacity).
- :mod:`.sysfs`: :func:`~composer_numa.machine.sysfs.discover` reads a live or recorded tree into it.
- :mod:`.files`, :mod:`.procfs`: bounded, non-blocking readers and the procfs/cgroup formats.
- :mod:`.capacity`: how many bytes each node (and the memory cgroup) can give a process now.
- :mod:`.gpus`: which GPUs this process sees, in CUDA's numbering.
- :mod:`.rankenv`: which local rank this process is, from the launcher's variables.
"""
