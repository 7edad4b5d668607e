"""The guest's virtio core (drivers/virtio/ in Linux).

    virtqueue.py     the driver-facing virtqueue interface (struct virtqueue + its API)
    ring_split.py    the split ring behind it (virtio_ring.c, *_split functions)
    core.py          struct virtio_device / virtio_driver, the virtio bus, probe, negotiation
    mmio.py          the virtio-mmio transport driver (virtio_mmio.c)
"""
