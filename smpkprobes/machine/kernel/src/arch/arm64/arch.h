/* SPDX-License-Identifier: MIT */
/*
 * arm64 specifics needed by the arch-neutral C sources.  Only things that
 * cannot be expressed in C live here; each is a single instruction.
 */
#ifndef SMPK_ARCH_H
#define SMPK_ARCH_H

#define ARCH_NAME "arm64"

/* Spin-wait hint inside spin_lock(). */
static inline __attribute__((always_inline)) void cpu_relax(void)
{
	__asm__ __volatile__("yield" ::: "memory");
}

/* Execute an architecturally undefined instruction (bad_insn()). */
static inline __attribute__((always_inline)) void arch_bad_insn(void)
{
	__asm__ __volatile__("udf #0" ::: "memory");
}

/*
 * First stack-passed argument slot of the current function, given its frame
 * address.  AAPCS64 puts the 9th integer argument at the caller's SP, i.e.
 * at this function's SP on entry.  clang (non-Darwin) places the frame
 * record [fp] = saved x29, [fp + 8] = saved x30 at the top of the frame when
 * x29/x30 are the only callee-saved registers, as in
 * jprobe_scribble_handler: "sub sp, sp, #N; stp x29, x30, [sp, #N-16];
 * add x29, sp, #N-16", so the entry SP is fp + 16.  (A function that also
 * saves x19.. puts its frame record below them; __builtin_dwarf_cfa() is no
 * help either, clang lowers it to fp + 0 on AArch64.)
 */
#define ARCH_STACK_ARGS(fp) ((long *)(fp) + 2)

/* Integer arguments passed in registers (x0-x7). */
#define ARCH_NR_ARG_REGS 8

#endif /* SMPK_ARCH_H */
