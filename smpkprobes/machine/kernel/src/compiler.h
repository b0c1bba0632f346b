/* SPDX-License-Identifier: MIT */
/*
 * Compiler helpers.
 *
 * The machine places probes on guest functions by symbol, walks stacks via
 * the frame-pointer chain and expects every API function to be a real call
 * target.  These macros keep clang from inlining, merging, tail-calling or
 * constant-folding across the functions listed in kernel.h.
 */
#ifndef SMPK_COMPILER_H
#define SMPK_COMPILER_H

/* An out-of-line, always-emitted global function. */
#define __kapi      __attribute__((noinline, used))
#define __noreturn  __attribute__((noreturn))
#define __section(s) __attribute__((section(s)))

/*
 * Compiler-only memory barrier.  Emits no instruction but has side effects,
 * so clang cannot infer readnone/readonly for the enclosing function and
 * therefore cannot drop, hoist or merge calls to it.
 */
#define barrier() __asm__ __volatile__("" ::: "memory")

/*
 * Return @x unchanged, but make its value unknown to the optimiser (also
 * emits no instruction).  Used so that callers cannot see, e.g., a constant
 * return value through interprocedural constant propagation.
 */
#define OPAQUE(x) ({ __typeof__(x) __v = (x); __asm__ __volatile__("" : "+r"(__v)); __v; })

/*
 * Mark arguments as used.  clang drops arguments a callee ignores even for
 * global functions: callers then leave garbage in the argument registers
 * (fork_loop would not load clone_flags = 0x11 for do_fork).  Probe handlers
 * read those arguments, so every parameter of a probe target is "used" via an
 * empty asm (no instructions emitted).
 */
#define USE(x) __asm__ __volatile__("" :: "r"(x))

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif /* SMPK_COMPILER_H */
