"""virtio-net, device side."""
