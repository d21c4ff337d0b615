//! Start-up code: the PVH entry (32-bit protected mode, paging off), the AP real-mode
//! trampoline, identity page tables, the GDT, exception stubs and the CPL3 round trip.
//!
//! All of it is position-dependent and linked at physical addresses (see link.ld).

core::arch::global_asm!(
    r#"
/* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen" -------------------------- */
.section .note.pvh, "a", @note
.balign 4
.long 4
.long 8
.long 18
.asciz "Xen"
.balign 4
.quad pvh_start
.balign 4

/* ---- Enter long mode from 32-bit protected mode, then far-jump to \target ------------ */
.macro ENTER_LONG_MODE target
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmp $0x08, $\target
.endm

.macro LOAD_DATA_SEGMENTS
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
.endm

.section .text.entry, "ax"
.code32
.global pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %esi                 /* physical address of hvm_start_info */
    lgdt gdt_ptr
    ENTER_LONG_MODE bsp64

.code64
bsp64:
    LOAD_DATA_SEGMENTS
    leaq bsp_stack_top(%rip), %rsp
    movl %esi, %edi
    call guest_main
1:  cli
    hlt
    jmp 1b

/* ---- Application processors: real mode at 0x8000 (SIPI vector 0x08) ------------------ */
.section .trampoline, "awx"
.code16
.global ap_trampoline
ap_trampoline:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl tramp_gdt_ptr
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap32
.balign 8
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

.section .text, "ax"
.code32
ap32:
    LOAD_DATA_SEGMENTS
    ENTER_LONG_MODE ap64

.code64
ap64:
    LOAD_DATA_SEGMENTS
    movl $0xfee00020, %esi          /* the local APIC's ID register */
    movl (%rsi), %eax
    shrl $24, %eax                  /* this AP's APIC id: its stack, so a CPU that is removed */
    andl $63, %eax                  /* and added again gets the same one */
    leal -1(%rax), %edi             /* this AP's slot, 0-based (the BSP is APIC id 0) */
    shll $14, %eax                  /* 16 KiB stacks */
    leaq ap_stacks(%rip), %rsp
    addq %rax, %rsp
    call ap_main
1:  cli
    hlt
    jmp 1b

/* ---- Exceptions ---------------------------------------------------------------------- */
/* One 16-byte stub per vector, so the IDT can compute stub addresses as isr_base + 16*v. */
.balign 16
.global isr_base
isr_base:
.set vec, 0
.rept 32
    .balign 16
    .if (vec == 8) | (vec == 10) | (vec == 11) | (vec == 12) | (vec == 13) | (vec == 14) | (vec == 17) | (vec == 21) | (vec == 29) | (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
.endr

isr_common:
    /* stack: vector, error code, rip, cs, rflags, rsp, ss */
    cmpq $6, (%rsp)
    jne 2f
    testb $3, 24(%rsp)
    jz 2f
    /* #UD from CPL3: a user task ends with ud2; return from run_user. */
    movq user_return_rsp(%rip), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret
2:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq %rsp, %rdi
    call exception_handler
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq

/* void run_user(u64 entry, u64 arg, u64 user_stack_top): runs entry(arg) at CPL3 until
 * it executes ud2. */
.global run_user
run_user:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, user_return_rsp(%rip)
    pushq $0x23                     /* ss: user data, RPL 3 */
    pushq %rdx                      /* rsp */
    pushq $0x2                      /* rflags: interrupts stay off */
    pushq $0x2b                     /* cs: user code, RPL 3 */
    pushq %rdi                      /* rip */
    movq %rsi, %rdi
    iretq

/* ---- Data ---------------------------------------------------------------------------- */
.section .data, "aw"
.balign 16
.global gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CF9A000000FFFF        /* 0x18 kernel code, 32-bit (start-up) */
    .quad 0x00CFF2000000FFFF        /* 0x20 user data */
    .quad 0x00AFFA000000FFFF        /* 0x28 user code, 64-bit */
    .quad 0, 0                      /* 0x30 TSS, written at run time */
gdt_end:
.balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

.global ap_next_slot
ap_next_slot:
    .long 0
.balign 8
user_return_rsp:
    .quad 0

/* Identity map of the first 4 GiB with 2 MiB pages, user-accessible (the CPL3 tasks use it). */
.section .data.pagetables, "aw"
.balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
.set page, 0
.rept 2048
    .quad (page << 21) | 0x87
    .set page, page + 1
.endr

.section .bss, "aw", @nobits
.balign 4096
bsp_stack:
    .skip 65536
bsp_stack_top:
.global ap_stacks
ap_stacks:
    .skip 16384 * 64
"#,
    options(att_syntax)
);

/// Most application processors the guest will start (the stacks reserved above).
pub const MAX_APS: u32 = 63;

extern "C" {
    pub static mut gdt: [u64; 8];
    pub static isr_base: u8;
    pub fn run_user(entry: u64, arg: u64, user_stack_top: u64);
}

/// Registers saved by `isr_common`, followed by the CPU's interrupt frame.
#[repr(C)]
pub struct Frame {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
