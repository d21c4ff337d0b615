//! migrated: live migration and snapshots (issue 7). Built so far: the stream format.

pub mod stream;
