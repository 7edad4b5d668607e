"""virtio-console, device side: ports with names and host backends (a pseudo-terminal, a log
file, a Unix socket), the multiport control protocol, the console size."""
