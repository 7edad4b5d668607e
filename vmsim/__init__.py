"""vmsim: the Linux virtio subsystem run for real as processes.

Packages, by layer (see README "Architecture"):
  vmsim.abi       what the virtio spec fixes (bits, layouts, pure helpers); no I/O
  vmsim.machine   the simulated machine both sides plug into: shared memory, eventfds,
                  the trap wire, the stats region; knows nothing of virtio semantics
  vmsim.guest     the driver side (a Linux guest's virtio core, transports, drivers)
  vmsim.host      the device side (the VMM: transport emulation, vringh, device backends)
  vmsim.launcher  parses a topology, spawns host and guests, watches, cleans up, reports
"""

__version__ = "0.1.0"
