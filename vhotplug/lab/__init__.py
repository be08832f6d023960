"""The lab: the project's own test guest."""

DEFAULT_NAME = "vhotplug-lab"
