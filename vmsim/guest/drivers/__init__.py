"""Guest device drivers, registered on the virtio bus by id table."""
