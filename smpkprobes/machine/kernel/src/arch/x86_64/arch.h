/* SPDX-License-Identifier: MIT */
/*
 * x86_64 specifics needed by the arch-neutral C sources.  Only things that
 * cannot be expressed in C live here; each is a single instruction.
 */
#ifndef SMPK_ARCH_H
#define SMPK_ARCH_H

#define ARCH_NAME "x86_64"

/* Spin-wait hint inside spin_lock(). */
static inline __attribute__((always_inline)) void cpu_relax(void)
{
	__asm__ __volatile__("pause" ::: "memory");
}

/* Execute an architecturally undefined instruction (bad_insn()). */
static inline __attribute__((always_inline)) void arch_bad_insn(void)
{
	__asm__ __volatile__("ud2" ::: "memory");
}

/*
 * First stack-passed argument slot of the current function, given its frame
 * address: [fp] = saved rbp, [fp + 8] = return address, [fp + 16] = the 7th
 * integer argument (the caller's outgoing-argument area).
 */
#define ARCH_STACK_ARGS(fp) ((long *)(fp) + 2)

/* Integer arguments passed in registers (rdi, rsi, rdx, rcx, r8, r9). */
#define ARCH_NR_ARG_REGS 6

#endif /* SMPK_ARCH_H */
