"""virtio-blk, device side."""
