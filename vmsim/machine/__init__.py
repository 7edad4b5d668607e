"""The simulated machine that guest and host plug into, as KVM and the host kernel are for a
real VM: shared-memory objects (guest RAM, the stats region), eventfds (ioeventfd / irqfd),
the trap wire (register accesses as msgpack requests over a Unix socket, fds by SCM_RIGHTS),
run naming and process plumbing. It knows nothing of virtio semantics (that is vmsim.abi)
and nothing of either side.
"""
