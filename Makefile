# vhotplug: the two commands a fresh Debian 12 machine needs are `make demo` and `make test`.
# Both run `setup` first (Debian packages, .venv, libvirtd), so nothing else is required.

VENV      ?= .venv
PY        := $(VENV)/bin/python
VHOTPLUG  := $(VENV)/bin/vhotplug
LAB_NAME  ?= vhotplug-lab
PYTEST_ARGS ?=

.PHONY: setup lab demo demo-passthrough demo-xen test test-unit test-lab test-nested test-xen lint bench bench-xen soak lab-down stop-daemons clean

setup:
	bash scripts/setup-host.sh

lab: setup
	$(VHOTPLUG) lab build

demo: setup
	bash scripts/demo.sh $(LAB_NAME)

# The seed's passthrough scenarios for real, one level down: L1 (virtual IOMMU) gives its e1000 and a USB
# device to L2, driven from here over qemu+ssh (see "The nested lab" in the README).
demo-passthrough: setup
	bash scripts/demo-passthrough.sh

# The seed's Xen plan (1.4) and the other hot-plugs against Xen 4.17 + libvirt's Xen driver: the Xen lab
# (dom0 as a TCG domain here) and a PV lab guest in it, driven from here over xen+ssh (see "Xen" in the README).
demo-xen: setup
	bash scripts/demo-xen.sh

lint: setup
	$(VENV)/bin/ruff check vhotplug tests bench

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-lab: setup
	$(VENV)/bin/pytest tests/lab $(PYTEST_ARGS)

test-nested: setup
	$(VENV)/bin/pytest tests/nested $(PYTEST_ARGS)

# Xen 4.17 + dom0 (libvirt's Xen driver) as one TCG domain, a PV lab guest inside it (see "The Xen lab").
test-xen: setup
	$(VENV)/bin/pytest tests/xen $(PYTEST_ARGS)

# Not a test: 20 NIC cycles on the lab, vhotplug vs. a virsh + ssh loop (see bench/nic_cycle.py).
bench: setup
	$(PY) bench/nic_cycle.py --cycles 20

# The same on Xen: netfront NICs into the Xen lab's PV guest over xen+ssh, the guest behind dom0.
bench-xen: setup
	$(PY) bench/nic_cycle.py --xen --cycles 10

# Not a test: 8 concurrent processes x 25 NIC attach/detach cycles over 4 lab domains, each operation a vhotplug
# process with --wait-lock; ops, failures by kind, p50/p95 latency, lost/duplicated/wrong (see bench/soak.py).
soak: setup
	$(PY) bench/soak.py --domains 4 --workers 8 --cycles 25

lab-down:
	$(VHOTPLUG) lab down --name $(LAB_NAME)

# Stops only the daemons scripts/setup-host.sh started (recorded by PID).
stop-daemons:
	bash scripts/stop-daemons.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
