//! What may be served as a disk, checked the same way where an image is opened by path
//! (vmm-core's `--disk path=`, blockd's `--image`) and where blockd gets it as a descriptor.

/// An image path or descriptor that is neither a regular file nor a block device.
#[derive(Debug, thiserror::Error)]
#[error("{0}: not a disk image; give a regular file (raw or qcow2) or a block device")]
pub struct NotAnImage(pub &'static str);

/// What kind of file `meta` describes, in the words an error uses.
pub fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Ok for a regular file or a block device; otherwise what it is.
pub fn check(meta: &std::fs::Metadata) -> Result<(), NotAnImage> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        Ok(())
    } else {
        Err(NotAnImage(kind(meta)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn directories_and_character_devices_are_not_images() {
        let dir = std::fs::metadata("/").unwrap();
        assert_eq!(
            super::check(&dir).unwrap_err().to_string(),
            "a directory: not a disk image; give a regular file (raw or qcow2) or a block device"
        );
        let null = std::fs::metadata("/dev/null").unwrap();
        assert_eq!(super::kind(&null), "a character device");
        assert!(super::check(&null).is_err());
        let exe = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        assert!(super::check(&exe).is_ok());
    }
}
