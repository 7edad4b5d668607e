"""vhost-user: vmsim's device backends served to any frontend over QEMU's vhost-user protocol
(docs/interop/vhost-user.rst).

    protocol.py   what the protocol fixes: request numbers, flags, feature bits, payload layouts
                  (side-neutral: a frontend uses it as much as a backend)
    wire.py       one message on an AF_UNIX SOCK_STREAM socket, fds by SCM_RIGHTS, bounded
    memory.py     the frontend's memory regions mapped from its fds; user and guest addresses
    vring.py      one ring's vhost-user state and its device-side queue
    devices.py    what a device contributes: features, config space, queues, request service
    session.py    one frontend connection, message by message
    server.py     `vmsim backend`: listen, serve sessions one after another, stop on a signal
"""
