//! Just enough ACPI: find the RSDP, walk the XSDT (or RSDT), read the FADT's power-off and
//! reset registers, \_S5 from the DSDT, and the MADT's CPUs.

use crate::io;

pub struct Tables {
    pub fadt: Option<u64>,
    madt: Option<u64>,
}

fn rd8(a: u64) -> u8 {
    // SAFETY: ACPI tables are in identity-mapped RAM; callers stay inside a table's length.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn rd16(a: u64) -> u16 {
    rd8(a) as u16 | (rd8(a + 1) as u16) << 8
}
fn rd32(a: u64) -> u32 {
    rd16(a) as u32 | (rd16(a + 2) as u32) << 16
}
fn rd64(a: u64) -> u64 {
    rd32(a) as u64 | (rd32(a + 4) as u64) << 32
}

/// An AML integer at `a`: its value and how many bytes it takes.
fn aml_integer(a: u64) -> Option<(u64, u64)> {
    Some(match rd8(a) {
        0x00 => (0, 1),
        0x01 => (1, 1),
        0xff => (u64::MAX, 1),
        0x0a => (rd8(a + 1) as u64, 2),
        0x0b => (rd16(a + 1) as u64, 3),
        0x0c => (rd32(a + 1) as u64, 5),
        0x0e => (rd64(a + 1), 9),
        _ => return None,
    })
}

fn sig(a: u64, s: &[u8; 4]) -> bool {
    (0..4).all(|i| rd8(a + i) == s[i as usize])
}

fn checksum_ok(a: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(rd8(a + i));
    }
    sum == 0
}

/// A Generic Address Structure: (address space, address).
#[derive(Clone, Copy)]
struct Gas {
    space: u8,
    addr: u64,
}

impl Gas {
    fn at(a: u64) -> Gas {
        Gas {
            space: rd8(a),
            addr: rd64(a + 4),
        }
    }

    fn write8(self, v: u8) -> bool {
        match (self.space, self.addr) {
            (_, 0) => false,
            (0, a) => {
                // SAFETY: system memory space: the firmware tables name a device register.
                unsafe { core::ptr::write_volatile(a as *mut u8, v) };
                true
            }
            (1, a) => {
                io::outb(a as u16, v);
                true
            }
            _ => false,
        }
    }
}

pub struct Madt {
    pub count: u32,
    pub enabled: u32,
    pub apic_ids: [u32; 256],
    pub enabled_mask: [bool; 256],
}

impl Tables {
    pub fn find(rsdp_hint: u64) -> Option<Tables> {
        let rsdp = if rsdp_hint != 0 {
            rsdp_hint
        } else {
            (0xe0000..0x100000u64).step_by(16).find(|&a| {
                (0..8).all(|i| rd8(a + i) == b"RSD PTR "[i as usize]) && checksum_ok(a, 20)
            })?
        };
        let revision = rd8(rsdp + 15);
        let (root, entry_size) = if revision >= 2 && rd64(rsdp + 24) != 0 {
            (rd64(rsdp + 24), 8)
        } else {
            (rd32(rsdp + 16) as u64, 4)
        };
        let len = rd32(root + 4) as u64;
        if !checksum_ok(root, len) {
            return None;
        }
        let mut t = Tables {
            fadt: None,
            madt: None,
        };
        let mut e = root + 36;
        while e + entry_size <= root + len {
            let table = if entry_size == 8 {
                rd64(e)
            } else {
                rd32(e) as u64
            };
            if sig(table, b"FACP") {
                t.fadt = Some(table);
            } else if sig(table, b"APIC") {
                t.madt = Some(table);
            }
            e += entry_size;
        }
        Some(t)
    }

    pub fn hw_reduced(&self) -> bool {
        self.fadt.is_some_and(|f| rd32(f + 112) & (1 << 20) != 0)
    }

    fn dsdt(&self) -> Option<u64> {
        let f = self.fadt?;
        let len = rd32(f + 4) as u64;
        let x = if len >= 148 { rd64(f + 140) } else { 0 };
        Some(if x != 0 { x } else { rd32(f + 40) as u64 })
    }

    /// The VM generation ID's address: the VMGenID device's `ADDR` package (low and high 32
    /// bits) in the DSDT, as Linux's vmgenid driver evaluates it.
    pub fn vmgenid_addr(&self) -> Option<u64> {
        let dsdt = self.dsdt()?;
        let len = rd32(dsdt + 4) as u64;
        let mut a = dsdt + 36;
        while a + 8 < dsdt + len {
            if sig(a, b"ADDR") && rd8(a + 4) == 0x12 {
                let pkg_len_bytes = (rd8(a + 5) >> 6) as u64 + 1;
                let mut elem = a + 5 + pkg_len_bytes + 1;
                let (lo, n) = aml_integer(elem)?;
                elem += n;
                let (hi, _) = aml_integer(elem)?;
                return Some(lo | hi << 32);
            }
            a += 1;
        }
        None
    }

    /// SLP_TYPa of \_S5, found the way small kernels do: the `_S5_` package in the DSDT.
    pub fn slp_typ_s5(&self) -> Option<u8> {
        let dsdt = self.dsdt()?;
        let len = rd32(dsdt + 4) as u64;
        let mut a = dsdt + 36;
        while a + 8 < dsdt + len {
            if sig(a, b"_S5_") && rd8(a + 4) == 0x12 {
                let pkg_len_bytes = (rd8(a + 5) >> 6) as u64 + 1;
                let elem = a + 5 + pkg_len_bytes + 1;
                return Some(match rd8(elem) {
                    0x0a => rd8(elem + 1),
                    0x00 => 0,
                    0x01 => 1,
                    v => v,
                });
            }
            a += 1;
        }
        None
    }

    pub fn madt(&self) -> Madt {
        let mut m = Madt {
            count: 0,
            enabled: 0,
            apic_ids: [0; 256],
            enabled_mask: [false; 256],
        };
        let Some(t) = self.madt else { return m };
        let len = rd32(t + 4) as u64;
        let mut e = t + 44;
        while e + 2 <= t + len {
            let (kind, elen) = (rd8(e), rd8(e + 1) as u64);
            if elen == 0 {
                break;
            }
            let entry = match kind {
                0 => Some((rd8(e + 3) as u32, rd32(e + 4))),
                9 => Some((rd32(e + 4), rd32(e + 8))),
                _ => None,
            };
            if let Some((id, flags)) = entry {
                let i = m.count as usize;
                if i < 256 {
                    m.apic_ids[i] = id;
                    m.enabled_mask[i] = flags & 1 != 0;
                }
                m.count += 1;
                m.enabled += flags & 1;
            }
            e += elen;
        }
        m
    }

    pub fn power_off(&self) {
        let Some(f) = self.fadt else { return };
        let typ = self.slp_typ_s5().unwrap_or(5);
        if self.hw_reduced() {
            // Sleep control register: SLP_TYP in bits 2..4, SLP_EN is bit 5.
            Gas::at(f + 244).write8(((typ & 7) << 2) | 0x20);
        } else {
            let pm1a_cnt = rd32(f + 64) as u16;
            if pm1a_cnt != 0 {
                io::outw(pm1a_cnt, ((typ as u16 & 7) << 10) | (1 << 13));
            }
        }
    }

    pub fn reset(&self) {
        if let Some(f) = self.fadt {
            if rd32(f + 112) & (1 << 10) != 0 && Gas::at(f + 116).write8(rd8(f + 128)) {
                return;
            }
        }
        // No reset register: the keyboard controller's pulse-reset command.
        io::outb(0x64, 0xfe);
    }
}
