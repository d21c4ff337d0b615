//! Shared by vmm-core and its helpers to run as services: systemd's readiness notification
//! and socket activation. (The namespace, capability and seccomp sandbox comes here too.)

pub mod systemd;
