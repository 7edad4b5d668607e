"""The frontend half of vhost-user: a host device whose rings another process serves."""
