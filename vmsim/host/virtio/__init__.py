"""The device side of virtio.

    errors.py        why a ring is bad: one flat set of reasons named after the spec
    chain.py         a descriptor chain as the device sees it (readable/writable segments)
    queue_split.py   the split ring, device side (vringh / vhost)
    device.py        the device model: status machine, features, config space, queues,
                     virtio_error
    mmio.py          virtio-mmio register emulation
"""
