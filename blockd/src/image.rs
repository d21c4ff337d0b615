//! Image formats behind a disk: raw (positioned vectored I/O on the file) and qcow2 (imago, a
//! Rust qcow2 implementation by one of QEMU's block maintainers).

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder};
use std::fs::File;
use std::io::IoSlice;
use std::io::IoSliceMut;
use std::sync::RwLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// An image format blockd does not serve.
#[derive(Debug, thiserror::Error)]
#[error("{0}: not an image format; write raw or qcow2")]
pub struct UnknownFormat(String);

impl std::str::FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Format, UnknownFormat> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(UnknownFormat(s.to_string())),
        }
    }
}

/// The qcow2 magic, "QFI\xfb".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// A qcow2 image. Reads and writes share the lock; discards (which change the mapping in ways
/// imago wants exclusive access for) take it alone.
pub struct Qcow2Image {
    access: RwLock<FormatAccess<imago::file::File>>,
    pub size: u64,
}

/// One image of a backing chain, read-only, over what lies below it.
fn layer(
    file: File,
    format: Format,
    below: Option<FormatAccess<imago::file::File>>,
) -> std::io::Result<FormatAccess<imago::file::File>> {
    let storage = imago::file::File::try_from(file)?;
    Ok(match format {
        Format::Raw => FormatAccess::new(
            imago::raw::Raw::builder(storage)
                .write(false)
                .open(DenyImplicitOpenGate::default())?,
        ),
        Format::Qcow2 => FormatAccess::new(
            Qcow2::<imago::file::File>::builder(storage)
                .write(false)
                .backing(below)
                .open(DenyImplicitOpenGate::default())?,
        ),
    })
}

impl Qcow2Image {
    /// The image, over its backing chain (`backing`, nearest first, each opened by
    /// whoever could: blockd's sandbox opens no path). Reads fall through the chain; writes go
    /// to the image only.
    pub fn open(
        file: File,
        writable: bool,
        backing: Vec<(File, Format)>,
    ) -> std::io::Result<Qcow2Image> {
        let mut below = None;
        for (f, format) in backing.into_iter().rev() {
            below = Some(layer(f, format, below)?);
        }
        let storage = imago::file::File::try_from(file)?;
        let q = Qcow2::<imago::file::File>::builder(storage)
            .write(writable)
            .backing(below)
            .open(DenyImplicitOpenGate::default())
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot open the qcow2 image ({e})"))
            })?;
        let access = FormatAccess::new(q);
        let size = access.size();
        Ok(Qcow2Image {
            access: RwLock::new(access),
            size,
        })
    }

    /// # Safety
    /// Every iovec must name memory that is valid to write for its length during the call.
    pub unsafe fn readv(&self, iovs: &[libc::iovec], offset: u64) -> std::io::Result<u64> {
        let slices: Vec<IoSliceMut> = iovs
            .iter()
            .map(|v| {
                // SAFETY: the caller guarantees each iovec is valid writable memory.
                IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len)
                })
            })
            .collect();
        let n: usize = iovs.iter().map(|v| v.iov_len).sum();
        self.access
            .read()
            .unwrap()
            .readv(IoVectorMut::from(slices), offset)?;
        Ok(n as u64)
    }

    /// # Safety
    /// Every iovec must name memory that is valid to read for its length during the call.
    pub unsafe fn writev(&self, iovs: &[libc::iovec], offset: u64) -> std::io::Result<u64> {
        let slices: Vec<IoSlice> = iovs
            .iter()
            .map(|v| {
                // SAFETY: the caller guarantees each iovec is valid readable memory.
                IoSlice::new(unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                })
            })
            .collect();
        let n: usize = iovs.iter().map(|v| v.iov_len).sum();
        self.access
            .read()
            .unwrap()
            .writev(IoVector::from(slices), offset)?;
        Ok(n as u64)
    }

    /// Grows the virtual size to `bytes`; the new range reads as zeroes (no backing file's
    /// data shows through).
    pub fn grow(&self, bytes: u64) -> std::io::Result<()> {
        self.access
            .read()
            .unwrap()
            .resize_grow(bytes, imago::format::PreallocateMode::Zero)
    }

    /// Writes cached metadata back and makes everything durable.
    pub fn flush(&self) -> std::io::Result<()> {
        let a = self.access.read().unwrap();
        a.flush()?;
        a.sync()
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.access.read().unwrap().write_zeroes(offset, len)
    }

    /// Deallocates the range so that it reads as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.access.write().unwrap().discard_to_zero(offset, len)
    }
}
