/* SPDX-License-Identifier: MIT */
/*
 * i386 specifics needed by the arch-neutral C sources.  Only things that
 * cannot be expressed in C live here; each is a single instruction.
 */
#ifndef SMPK_ARCH_H
#define SMPK_ARCH_H

#define ARCH_NAME "i386"

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
 * address: [fp] = saved ebp, [fp + 4] = return address, [fp + 8] = the first
 * argument (cdecl passes every argument on the stack).
 */
#define ARCH_STACK_ARGS(fp) ((long *)(fp) + 2)

/* cdecl: no integer arguments in registers. */
#define ARCH_NR_ARG_REGS 0

#endif /* SMPK_ARCH_H */
