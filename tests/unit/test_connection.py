"""virsh conventions: domain lookup order and --live/--config/--current/--persistent flags."""

from __future__ import annotations

import libvirt
import pytest

from vhotplug import errors
from vhotplug.virt.connection import affect_flags, connection, lookup_domain

LIVE, CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG


@pytest.mark.parametrize(("opts", "running", "flags"), [
    ({}, True, 0),
    ({"current": True}, False, 0),
    ({"live": True}, True, LIVE),
    ({"config": True}, False, CONFIG),
    ({"live": True, "config": True}, True, LIVE | CONFIG),
    ({"persistent": True}, True, LIVE | CONFIG),
    ({"persistent": True}, False, CONFIG),
])
def test_affect_flags(opts, running, flags):
    args = {"live": False, "config": False, "current": False, "persistent": False, **opts}
    assert affect_flags(running=running, **args) == flags


def test_live_on_stopped_domain_refused():
    with pytest.raises(errors.OperationInvalid, match="--live needs a running domain"):
        affect_flags(live=True, config=False, current=False, running=False)


def test_current_exclusive():
    with pytest.raises(errors.InvalidRequest):
        affect_flags(live=True, config=False, current=True, running=True)


def test_lookup_by_name_id_uuid():
    with connection("test:///default") as conn:
        uuid = conn.lookupByName("test").UUIDString()
        for ident in ("test", "1", uuid, f" {uuid} "):
            assert lookup_domain(conn, ident).name() == "test"
        with pytest.raises(errors.DomainNotFound):
            lookup_domain(conn, "42")
        with pytest.raises(errors.InvalidRequest):
            lookup_domain(conn, "  ")
