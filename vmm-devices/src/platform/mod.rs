//! The platform's port-I/O devices: the 8250 UART, ACPI power management and its Generic
//! Event Device, the CPU and PCI hotplug controllers, and pvpanic.

pub mod cpu_hotplug;
pub mod ged;
pub mod pci_hotplug;
pub mod power;
pub mod pvpanic;
pub mod serial;
