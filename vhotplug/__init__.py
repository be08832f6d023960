"""vhotplug: hot-plug devices into running libvirt guests and prove it inside the guest."""

__version__ = "0.1.0"
