/* SPDX-License-Identifier: MIT */
/*
 * 32-bit PowerPC (big-endian, SysV ABI) specifics needed by the arch-neutral
 * C sources.  Only things that cannot be expressed in C live here; each is a
 * single instruction.
 */
#ifndef SMPK_ARCH_H
#define SMPK_ARCH_H

#define ARCH_NAME "ppc"

/*
 * Spin-wait hint inside spin_lock(): "or 1,1,1" lowers the SMT thread
 * priority on POWER and is an ordinary no-op everywhere else.
 */
static inline __attribute__((always_inline)) void cpu_relax(void)
{
	__asm__ __volatile__("or 1,1,1" ::: "memory");
}

/*
 * Execute an architecturally undefined instruction (bad_insn()).  Primary
 * opcode 0 is reserved ("illegal") on every PowerPC.
 */
static inline __attribute__((always_inline)) void arch_bad_insn(void)
{
	__asm__ __volatile__(".long 0" ::: "memory");
}

/*
 * First stack-passed argument slot of the current function, given its frame
 * address.  The SysV ppc32 frame starts with the back chain: 0(fp) is the
 * caller's stack pointer, and the caller's frame holds its back chain at
 * 0, the LR save word at 4 and the outgoing (overflow) arguments from 8.
 */
#define ARCH_STACK_ARGS(fp) ((long *)(*(unsigned long *)(fp)) + 2)

/* Integer arguments passed in registers (r3 .. r10). */
#define ARCH_NR_ARG_REGS 8

#endif /* SMPK_ARCH_H */
