"""The virtio ABI: only what the virtio specification (and Linux's uapi headers) fix.

Both the guest (driver side) and the host (device side) import this package and nothing of
each other. It holds constants, layouts and pure helpers; it does no I/O.
"""
