//! Loading the guest: kernel (bzImage through the 64-bit boot protocol, or ELF through its PVH
//! note), initramfs, command line, memory map and ACPI tables.

pub mod acpi;
pub mod vmgenid;

use crate::config::{KernelFormat, VmConfig};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress};
use vmm_devices::layout::{ram_ranges, GuestMemory};

// Guest-physical layout below 1 MiB.
pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// The EBDA and legacy BIOS/VGA area up to 1 MiB is reserved in the memory map.
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// ACPI tables live in the legacy BIOS area, where a guest may also scan for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_MAGIC: u32 = 0x336e_c578;

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh { entry: u64 },
    /// 64-bit mode on identity page tables, %rsi = boot_params (zero page).
    Linux64 { entry: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("--kernel {0}: cannot load it ({1}); is it a complete bzImage or x86_64 ELF that fits in guest RAM?")]
    Kernel(PathBuf, linux_loader::loader::Error),
    #[error("--kernel {0}: cannot open it")]
    KernelOpen(PathBuf, #[source] std::io::Error),
    #[error("--initramfs {0}: cannot read it")]
    Initramfs(PathBuf, #[source] std::io::Error),
    #[error("--initramfs {path}: {size} bytes do not fit in guest RAM between the kernel (ends at {kernel_end:#x}) and {limit:#x}; give the VM more --memory")]
    InitramfsTooBig {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
    #[error("cannot draw the VM generation ID (getrandom)")]
    GenerationId(#[source] std::io::Error),
    #[error("the memory map has {0} entries, more than the boot protocol carries")]
    TooManyE820(usize),
}

impl BootError {
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            BootError::Kernel(..)
                | BootError::KernelOpen(..)
                | BootError::Initramfs(..)
                | BootError::InitramfsTooBig { .. }
        )
    }
}

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820 {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// RAM with the EBDA/BIOS area marked reserved. The entries sum to exactly the RAM given.
pub fn e820_map(mem_size: u64) -> Vec<E820> {
    let mut map = Vec::new();
    for (start, len, _) in ram_ranges(mem_size) {
        if start == 0 {
            map.push(E820 {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            });
            map.push(E820 {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820_RESERVED,
            });
            map.push(E820 {
                addr: HIMEM_START,
                size: len - HIMEM_START,
                kind: E820_RAM,
            });
        } else {
            map.push(E820 {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// The kernel and the initramfs (with its size), opened once at start-up: every boot, reboots
/// included, reads them through these descriptors, so vmm-core's main thread opens no path
/// once it is filtered.
pub struct BootFiles {
    kernel: File,
    initramfs: Option<(File, u64)>,
}

impl BootFiles {
    pub fn open(config: &VmConfig) -> Result<BootFiles, BootError> {
        let kernel = File::open(&config.kernel)
            .map_err(|e| BootError::KernelOpen(config.kernel.clone(), e))?;
        let initramfs = match &config.initramfs {
            Some(path) => {
                let f = File::open(path).map_err(|e| BootError::Initramfs(path.clone(), e))?;
                let size = f
                    .metadata()
                    .map_err(|e| BootError::Initramfs(path.clone(), e))?
                    .len();
                Some((f, size))
            }
            None => None,
        };
        Ok(BootFiles { kernel, initramfs })
    }
}

/// A descriptor of `f` positioned at its start (a dup shares the offset, so it is rewound).
fn rewound(f: &File) -> std::io::Result<File> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(0))?;
    Ok(f)
}

/// Loads kernel, initramfs and command line, writes the boot protocol's structures and the ACPI
/// tables, and says how to enter the guest.
pub fn load(mem: &GuestMemory, config: &VmConfig, files: &BootFiles) -> Result<Entry, BootError> {
    let kpath = &config.kernel;
    let mut kfile = rewound(&files.kernel).map_err(|e| BootError::KernelOpen(kpath.clone(), e))?;
    let kerr = |e| BootError::Kernel(kpath.clone(), e);
    let (result, entry) = match config.kernel_format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kfile, None).map_err(kerr)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Entry::Pvh { entry: a.0 },
                _ => Entry::Linux64 {
                    entry: r.kernel_load.0,
                },
            };
            (r, entry)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
                .map_err(kerr)?;
            // The 64-bit entry of the protected-mode kernel is 0x200 past its start.
            let entry = Entry::Linux64 {
                entry: r.kernel_load.0 + 0x200,
            };
            (r, entry)
        }
    };

    let mut cmdline = config.cmdline.clone().into_bytes();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::GuestWrite("the command line", e))?;

    let low_ram_end = ram_ranges(config.memory)[0].1;
    let initrd = match (&config.initramfs, &files.initramfs) {
        (Some(path), Some((file, size))) => {
            let max_addr = result
                .setup_header
                .map(|h| h.initrd_addr_max as u64 + 1)
                .filter(|&m| m > HIMEM_START)
                .unwrap_or(low_ram_end)
                .min(low_ram_end);
            Some(load_initramfs(
                mem,
                path,
                (file, *size),
                result.kernel_end.max(HIMEM_START),
                max_addr,
            )?)
        }
        _ => None,
    };

    let rsdp = acpi::write_tables(mem, config)?;
    vmgenid::write(mem)?;
    let e820 = e820_map(config.memory);
    match entry {
        Entry::Pvh { .. } => write_pvh_info(mem, &e820, initrd, rsdp)?,
        Entry::Linux64 { .. } => {
            write_zero_page(mem, result.setup_header, &e820, initrd, rsdp, cmdline.len())?;
            write_long_mode_tables(mem)?;
        }
    }
    Ok(entry)
}

fn load_initramfs(
    mem: &GuestMemory,
    path: &std::path::Path,
    (file, size): (&File, u64),
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    let mut f = rewound(file).map_err(|e| BootError::Initramfs(path.to_path_buf(), e))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::GuestWrite("the initramfs", e))?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemory,
    e820: &[E820],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    if e820.len() > 128 {
        return Err(BootError::TooManyE820(e820.len()));
    }
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_START + 24 * i as u64))
            .map_err(|e| BootError::GuestWrite("the PVH memory map", e))?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|e| BootError::GuestWrite("the PVH module list", e))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|e| BootError::GuestWrite("the PVH start info", e))
}

fn write_zero_page(
    mem: &GuestMemory,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    e820: &[E820],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.loadflags |= 0x80; // CAN_USE_HEAP
    params.hdr.heap_end_ptr = 0xfe00;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    if e820.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| BootError::GuestWrite("the zero page", e))
}

/// Identity-maps the first 4 GiB with 2 MiB pages, and writes a flat GDT for 64-bit entry.
fn write_long_mode_tables(mem: &GuestMemory) -> Result<(), BootError> {
    let w = |what, v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| BootError::GuestWrite(what, e))
    };
    w("page tables", PDPTE_START | 0x3, PML4_START)?;
    for i in 0..4u64 {
        w(
            "page tables",
            (PDE_START + i * 0x1000) | 0x3,
            PDPTE_START + i * 8,
        )?;
    }
    for i in 0..2048u64 {
        w("page tables", (i << 21) | 0x83, PDE_START + i * 8)?;
    }
    for (i, d) in gdt_entries().iter().enumerate() {
        w("the GDT", *d, GDT_START + 8 * i as u64)?;
    }
    w("the IDT", 0, IDT_START)
}

/// null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub fn gdt_entries() -> [u64; 4] {
    [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_sums_to_the_ram_given() {
        for size in [128u64 << 20, 2 << 30, 3 << 30, 5 << 30] {
            let map = e820_map(size);
            assert_eq!(map.iter().map(|e| e.size).sum::<u64>(), size, "{size}");
            let usable: u64 = map
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(usable, size - (HIMEM_START - EBDA_START));
        }
        let high = e820_map(5 << 30);
        assert_eq!(high.last().unwrap().addr, 1 << 32);
    }
}
