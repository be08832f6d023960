"""Host side: node devices, IOMMU groups, who uses a device, and locks between vhotplug processes."""
