/* SPDX-License-Identifier: MIT */
/*
 * sparc64 (SPARC V9, 64-bit ABI) specifics needed by the arch-neutral C
 * sources.  Only things that cannot be expressed in C live here.
 */
#ifndef SMPK_ARCH_H
#define SMPK_ARCH_H

#define ARCH_NAME "sparc64"

/* Spin-wait hint inside spin_lock() (V9 has no pause instruction). */
static inline __attribute__((always_inline)) void cpu_relax(void)
{
	__asm__ __volatile__("nop" ::: "memory");
}

/*
 * Execute an architecturally undefined instruction (bad_insn()): ILLTRAP 0,
 * the all-zero word (clang 14's sparc assembler has no "illtrap" mnemonic).
 */
static inline __attribute__((always_inline)) void arch_bad_insn(void)
{
	__asm__ __volatile__(".word 0" ::: "memory");
}

/*
 * First stack-passed argument slot of the current function, given its frame
 * address.  clang's __builtin_frame_address(0) is %fp + 2047 (the V9 stack
 * bias removed), i.e. the caller's real stack pointer; above it lie the
 * 16-word register window save area and the 6 argument home words, then the
 * 7th integer argument: 128 + 48 = 176 bytes.
 */
#define ARCH_STACK_ARGS(fp) ((long *)((char *)(fp) + 176))

/* Integer arguments passed in registers (%o0-%o5). */
#define ARCH_NR_ARG_REGS 6

/*
 * This port's return addresses are resume addresses.  A SPARC call leaves
 * its own address in %o7 and the callee returns to %o7 + 8 (past the call's
 * delay slot); kprobes reports %o7 + 8 (ri->ret_addr, stack traces, regs.ip
 * in a return handler), as Linux sparc64 does for ri->ret_addr.  clang's
 * __builtin_return_address(0) is the bare %i7, the call site, so kernel.c's
 * recorded return addresses (target_return_address[], stacktrace_driver())
 * are adjusted here to the same convention.  The inner use is the builtin:
 * a macro is never expanded inside its own replacement.
 */
#define __builtin_return_address(n) \
	((void *)((char *)__builtin_return_address(n) + 8))

#endif /* SMPK_ARCH_H */
