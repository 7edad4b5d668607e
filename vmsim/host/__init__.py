"""The host: the VMM that emulates virtio devices for the guests of a run.

    memory.py        guest memory as the device reaches it: one bounds-checked translation
    virtio/          the device side of virtio: device model (status, features, config,
                     virtio_error), device-side rings ("vringh"), transport emulation
    devices/         device backends, one folder each with the same rooms
    traps.py         serves the guests' trapped register accesses
    loop.py          the event loop: kicks, traps, polling the rings
    vm.py            one VM's devices, memory and wiring
    main.py          the host process
"""
