"""The guest: a Linux-like virtio driver stack in one process.

    platform.py          the machine as the guest sees it: trapped register access, ioeventfd
                         routing of notify writes, the interrupt controller (irq thread)
    memory.py            guest RAM and its allocator (rings, buffers)
    virtio/              the virtio core (bus, probe, negotiation), virtqueues, transports
    drivers/             device drivers (virtio_blk ...)
    workloads/           applications that drive the devices
    main.py              the guest process: boot, probe, run workloads, report
"""
