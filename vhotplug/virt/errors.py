"""Translate ``libvirt.libvirtError`` into the vhotplug exception family, by error code, in one place."""

from __future__ import annotations

import libvirt

from vhotplug import errors

_BY_CODE: dict[int, type[errors.VhotplugError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: errors.DomainNotFound,
    libvirt.VIR_ERR_NO_NODE_DEVICE: errors.NotFound,
    libvirt.VIR_ERR_DEVICE_MISSING: errors.DeviceNotFound,
    libvirt.VIR_ERR_NO_CONNECT: errors.ConnectionFailed,
    libvirt.VIR_ERR_AUTH_FAILED: errors.ConnectionFailed,
    libvirt.VIR_ERR_AUTH_CANCELLED: errors.ConnectionFailed,
    libvirt.VIR_ERR_RPC: errors.ConnectionFailed,
    libvirt.VIR_ERR_OPERATION_INVALID: errors.OperationInvalid,
    libvirt.VIR_ERR_INVALID_ARG: errors.InvalidRequest,
    libvirt.VIR_ERR_XML_ERROR: errors.InvalidRequest,
    libvirt.VIR_ERR_XML_DETAIL: errors.InvalidRequest,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: errors.Unsupported,
    libvirt.VIR_ERR_NO_SUPPORT: errors.Unsupported,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: errors.Unsupported,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: errors.Unsupported,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: errors.Timeout,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: errors.Timeout,
}


def translate(exc: libvirt.libvirtError, context: str | None = None) -> errors.VhotplugError:
    """Return the vhotplug error for a libvirt error; the caller raises it ``from exc``."""
    code = exc.get_error_code()
    cls = _BY_CODE.get(code, errors.LibvirtFailure)
    message = exc.get_error_message() or str(exc)
    if context:
        message = f"{context}: {message}"
    return cls(message)


def silence_default_handler() -> None:
    """Stop libvirt from printing every error to stderr; we report them ourselves."""

    def _ignore(_ctx: object, _err: object) -> None:
        return None

    libvirt.registerErrorHandler(_ignore, None)
