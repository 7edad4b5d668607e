"""The built-in default topology: what `vmsim run` runs without a file."""

DEFAULT_TOPOLOGY = {
    "name": "default",
    "description": "one VM with one virtio-blk disk on virtio-mmio, written, read back and "
                   "verified at random offsets",
    "duration": 10,
    "vms": {
        "vm0": {
            "memory": "64M",
            "devices": {
                "vda": {"type": "blk", "transport": "mmio", "size": "64M",
                        "backend": "file"},
            },
            "workloads": {
                "verify": {"type": "blk-verify", "device": "vda", "in_flight": 16},
            },
        },
    },
}
