//! Debian's stock cloud kernel on vmm-core, booted from the bzImage the README's guest uses:
//! ACPI (with the CPU hotplug AML), SMP, memory, PCI and serial as Linux sees them, and on
//! hardware KVM the disk (vda, with its capacity) and power-off from user space; on KVM-PVM
//! (no user space) a vCPU hot-added through ACPI and taken by Linux, and a disk hot-added
//! and hot-removed through ACPI PCI hotplug.
//! About 8 minutes on a KVM-PVM host (kernel code is emulated there, the bzImage's own
//! decompressor too), under a second on hardware KVM. Needs the images from
//! scripts/build-images.sh. A panic never counts as a pass.

use std::time::Duration;
use vmm_tests::{host_is_pvm, images_dir, TempDir, TestVm};

/// GUEST.md's command line for a slow, emulated boot, and poweroff at the end. Two more
/// initcalls are skipped: cubictcp_register parses the whole vmlinux BTF (170 s of emulated
/// CPL0 code here) and blake2s_mod_init only runs a self-test (19 s); neither is platform code.
/// No RCU stall reports and no paravirtual spinlocks: under emulation the W+X page-table check
/// runs long enough for an RCU stall report, whose dump kicked the other vCPU with KVM's
/// KICK_CPU hypercall, which KVM-PVM answered with a #PF on the read-only kernel text (a guest
/// oops in kvm_kick_cpu, seen once in CI). Neither is platform code.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nokaslr mitigations=off cryptomgr.notests \
    tsc=reliable no_timer_check nowatchdog init_on_alloc=0 audit=0 \
    rcupdate.rcu_cpu_stall_suppress=1 nopvspin \
    initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs,\
cubictcp_register,blake2s_mod_init \
    vmm.scenario=poweroff";

/// On KVM-PVM, where Linux user space cannot make a system call, an initramfs whose /init
/// spins in user mode and makes none (a 122-byte static ELF: `jmp .`): the kernel runs on,
/// with no init to die and no panic, so it can be asked to take a hot-added vCPU.
fn spinning_initramfs(dir: &TempDir) -> std::path::PathBuf {
    const BASE: u64 = 0x40_0000;
    let code = [0xeb, 0xfe];
    let total = 64 + 56 + code.len() as u64;
    let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
    elf.extend([0u8; 8]);
    let u16s = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    elf.extend(u16s(&[2, 62])); // executable, x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((BASE + 64 + 56).to_le_bytes()); // entry: the code after the headers
    elf.extend(64u64.to_le_bytes()); // program headers at 64
    elf.extend(0u64.to_le_bytes());
    elf.extend(0u32.to_le_bytes());
    elf.extend(u16s(&[64, 56, 1, 0, 0, 0]));
    // One PT_LOAD, read and execute, of the whole file at BASE.
    elf.extend(1u32.to_le_bytes());
    elf.extend(5u32.to_le_bytes());
    for v in [0, BASE, BASE, total, total, 0x1000] {
        elf.extend(v.to_le_bytes());
    }
    elf.extend(code);
    // A newc cpio: /init, /dev, the trailer.
    let mut cpio = Vec::new();
    for (ino, (name, mode, data)) in [
        ("init", 0o100755u32, elf.as_slice()),
        ("dev", 0o040755, &[][..]),
        ("TRAILER!!!", 0, &[][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let fields = [ino as u32, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0];
        let mut h = String::from("070701");
        for f in fields {
            h += &format!("{f:08x}");
        }
        h += &format!("{:08x}{:08x}", name.len() + 1, 0);
        cpio.extend(h.as_bytes());
        cpio.extend(name.as_bytes());
        cpio.push(0);
        cpio.resize(cpio.len().next_multiple_of(4), 0);
        cpio.extend(data);
        cpio.resize(cpio.len().next_multiple_of(4), 0);
    }
    let path = dir.join("spin.cpio");
    std::fs::write(&path, cpio).unwrap();
    path
}

#[test]
fn debian_kernel_boots_to_init_with_2_cpus_and_128m() {
    let images = images_dir();
    let dir = TempDir::new("stock-disk");
    let pvm = host_is_pvm();
    let (kernel, initramfs) = (
        images.join("vmlinuz"),
        if pvm {
            spinning_initramfs(&dir)
        } else {
            images.join("initramfs.cpio")
        },
    );
    assert!(
        kernel.exists() && initramfs.exists(),
        "{} or {} is missing: run scripts/build-images.sh",
        kernel.display(),
        initramfs.display()
    );
    let slow = Duration::from_secs(20 * 60);
    // A disk on the PCI bus (virtio-blk over vhost-user, served by blockd).
    let disk = dir.join("disk.img");
    let sock = dir.join("api.sock");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut vm = TestVm::builder()
        .kernel(&kernel)
        .args(["--initramfs", initramfs.to_str().unwrap()])
        // Two more possible vCPUs: their processor devices (ACPI0007, _STA 0) are in the DSDT.
        .cpus("2,max=4")
        .memory("128M")
        .cmdline(CMDLINE)
        .arg("--disk")
        .arg(format!("path={},queues=2", disk.display()))
        .args(["--api-socket", sock.to_str().unwrap()])
        .spawn();

    vm.wait_for("smp: Brought up 1 node, 2 CPUs", slow);
    assert!(
        vm.stdout().contains("Allowing 4 CPUs, 2 hotplug CPUs"),
        "the kernel sees the 2 hot-pluggable vCPUs:\n{}",
        vm.stdout()
    );
    // "Memory: 83476K/130680K available": all of the 128 MiB but the first page and the
    // EBDA/BIOS area is RAM the kernel manages.
    let line = vm.wait_for("Memory: ", slow);
    let total_k: u64 = line
        .split("Memory: ")
        .nth(1)
        .and_then(|s| s.split('/').nth(1))
        .and_then(|s| s.split('K').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the memory total from {line:?}"));
    assert!((127 * 1024..=128 * 1024).contains(&total_k), "{line}");
    assert!(
        vm.stdout().contains("ACPI: APIC 0x"),
        "the kernel found our MADT"
    );
    // Linux's PCI core takes our root bridge (_CRS windows), ECAM (MCFG, reserved by the
    // motherboard device), and finds the virtio-blk function with its BAR where we put it.
    vm.wait_for("PCI host bridge to bus 0000:00", slow);
    let line = vm.wait_for("pci 0000:00:01.0: BAR 0", slow);
    // (Each slot has its 16 MiB of the window: slot 1's starts at 0xc1000000.)
    assert!(line.contains("[mem 0xc1000000-0xc1007fff]"), "{line}");
    let console = vm.stdout();
    for want in [
        "PCI: MMCONFIG at [mem 0xe0000000-0xe00fffff] reserved in ACPI motherboard resources",
        "root bus resource [mem 0xc0000000-0xdfffffff window]",
        "pci 0000:00:01.0: [1af4:1042] type 00 class 0x018000",
    ] {
        assert!(
            console.contains(want),
            "{want:?} not in the kernel log:\n{console}"
        );
    }
    vm.wait_for("Run /init as init process", slow);
    // ACPICA inside Linux interpreted our DSDT without complaint, and nothing went wrong in
    // the kernel on its way to init.
    let console = vm.stdout();
    for bad in [
        "ACPI Error",
        "ACPI BIOS Error",
        "ACPI Warning",
        "ACPI BIOS Warning",
        "Kernel panic",
        "Oops",
        "BUG:",
        "WARNING:",
    ] {
        assert!(
            !console.contains(bad),
            "the kernel reports {bad:?}:\n{console}"
        );
    }

    if pvm {
        // KVM-PVM cannot run Linux user space that makes system calls (GUEST.md), so /init
        // spins and the kernel runs on: ACPI CPU hotplug under Linux. A vCPU is hot-added;
        // Linux's ACPI processor driver takes it (our GED event, the CPU hotplug AML's
        // CSCN, its _STA and _MAT). Bringing it online is user space's part (a write to
        // /sys/devices/system/cpu/cpu2/online), which cannot run here; vda needs virtio_blk,
        // a module that user space loads, too.
        let (code, out, err) = vmm_tests::vmmctl(&sock, &["cpus", "set", "3", "--timeout", "600"]);
        assert_eq!(code, 0, "cpus set 3: {out}{err}\n{}", vm.stderr());
        vm.wait_for("CPU2 has been hot-added", slow);
        assert!(
            vm.stderr().contains("vCPU 2: the guest took it"),
            "{}",
            vm.stderr()
        );
        // ACPI PCI hotplug under Linux (acpiphp, built into Debian's kernel): a disk
        // hot-added is found in slot 2 by the rescan our GED event and PCNT's device check
        // start; hot-removed, Linux takes the function away and ejects the slot (its _EJ0),
        // which is what ends the removal. (Binding virtio_blk is user space's part: a module.)
        let hot = dir.join("hot.img");
        std::fs::write(&hot, vec![0u8; 1 << 20]).unwrap();
        let spec = format!("path={}", hot.display());
        let (code, out, err) = vmm_tests::vmmctl(&sock, &["disk", "add", &spec]);
        assert_eq!(code, 0, "disk add: {out}{err}\n{}", vm.stderr());
        assert!(out.contains("disk1: added at PCI 00:02.0"), "{out}");
        vm.wait_for("pci 0000:00:02.0: [1af4:1042] type 00 class 0x018000", slow);
        let (code, out, err) =
            vmm_tests::vmmctl(&sock, &["--timeout", "600", "disk", "remove", "disk1"]);
        assert_eq!(code, 0, "disk remove: {out}{err}\n{}", vm.stderr());
        assert!(
            vm.stderr()
                .contains("disk1: the guest ejected it; PCI 00:02.0 is empty"),
            "{}",
            vm.stderr()
        );
        let console = vm.stdout();
        for bad in [
            "Kernel panic",
            "Oops",
            "ACPI Error",
            "ACPI BIOS Error",
            "BUG:",
        ] {
            assert!(!console.contains(bad), "{bad:?}:\n{console}");
        }
        vm.signal(libc::SIGINT);
        assert_eq!(vm.wait_exit(slow), 130, "{}", vm.stderr());
    } else {
        let ready = vm.wait_for("vmm-init: ready", slow);
        assert!(ready.contains("scenario=poweroff"), "{ready}");
        assert!(vm.stdout().contains("vmm-init: cpus=2"), "{}", vm.stdout());
        assert!(
            vm.stdout().contains("vmm-init: loaded virtio_pci"),
            "{}",
            vm.stdout()
        );
        // Debian's virtio_blk found the disk with its 1 MiB: 2048 sectors of 512 bytes.
        assert!(
            vm.stdout()
                .contains("[vda] 2048 512-byte logical blocks (1.05 MB/1.00 MiB)"),
            "{}",
            vm.stdout()
        );
        assert_eq!(vm.wait_exit(slow), 0, "{}", vm.stderr());
        assert!(vm.stderr().contains("guest powered off"), "{}", vm.stderr());
    }
}
