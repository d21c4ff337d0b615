//! Shared by vmm-core and its helpers: the sandbox a helper enters before it reads untrusted
//! input (jail; seccomp comes next), and systemd's protocols (readiness notification, socket
//! activation).

pub mod jail;
pub mod systemd;
