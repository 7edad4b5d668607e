"""Device backends. Every device folder has the same rooms:

    device.py     the device: features offered, queues, lifecycle (a VirtioDevice)
    config.py     its configuration space layout
    request.py    how one request (a descriptor chain) is parsed and executed
    backend.py    where the data goes (files, memory, sockets, ...)
    metrics.py    the device's own counters
"""
