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

impl Format {
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What an image holds for a range (see `Qcow2Image::allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// Its own data.
    Data,
    /// Zeroes it says (over whatever lies below).
    Zero,
    /// Nothing: what lies below shows through.
    Below,
}

/// The qcow2 magic, "QFI\xfb".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// A qcow2 image. Reads and writes share the lock; discards (which change the mapping in ways
/// imago wants exclusive access for) take it alone.
pub struct Qcow2Image {
    access: RwLock<FormatAccess<imago::file::File>>,
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
        Ok(Qcow2Image {
            access: RwLock::new(FormatAccess::new(q)),
        })
    }

    /// The virtual size now.
    pub fn size(&self) -> u64 {
        self.access.read().unwrap().size()
    }

    /// Formats `file` (empty) as a qcow2 image of `size` bytes over a backing file: its name
    /// as the header is to give it (absolute, or relative to the new image) and its format.
    pub fn create_overlay(
        file: &File,
        size: u64,
        backing: &str,
        format: Format,
    ) -> std::io::Result<()> {
        use imago::FormatCreateBuilder;
        let storage = imago::file::File::try_from(file.try_clone()?)?;
        Qcow2::<imago::file::File>::create_builder(storage)
            .size(size)
            .backing(backing.to_string(), format.as_str().to_string())
            .create()
    }

    /// What this image itself holds for `len` bytes at `offset` (not its backing chain):
    /// how far that goes and what it is.
    pub fn allocation(&self, offset: u64, len: u64) -> std::io::Result<(Alloc, u64)> {
        use imago::format::drivers::ShallowMapping;
        let a = self.access.read().unwrap();
        let (m, n) = a.get_shallow_mapping(offset, len)?;
        let what = match m {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Alloc::Data,
            ShallowMapping::Zero { explicit: true, .. } => Alloc::Zero,
            ShallowMapping::Eof { .. } => return Ok((Alloc::Below, 0)),
            _ => Alloc::Below,
        };
        Ok((what, n.min(len)))
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
