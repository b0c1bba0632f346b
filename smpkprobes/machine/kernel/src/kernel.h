/* SPDX-License-Identifier: MIT */
/*
 * smpkprobes guest kernel: shared declarations.
 *
 * The guest is not a real kernel.  It is a set of functions with the names
 * and signatures of the Linux functions that kprobes tests (and the old
 * samples/kprobes) put probes on, plus a handful of helpers the machine uses
 * to drive faults, sleeps, locks and recursion.  Each task on each emulated
 * CPU runs one of these functions, entered by the machine with a return
 * address of __hc_task_return.
 */
#ifndef SMPK_KERNEL_H
#define SMPK_KERNEL_H

#include "types.h"
#include "compiler.h"

/*
 * Hypercalls (arch/<arch>/entry.S).  Each stub is a single return
 * instruction; the machine hooks the range [__hypercall_start,
 * __hypercall_end) and emulates the call.  C calls them as ordinary
 * extern functions.
 */
void __hc_console_write(const char *buf, unsigned long len);
void __hc_msleep(unsigned long ms);
void __hc_schedule(void);
void __hc_do_exit(long code);      /* never returns (not declared so: see do_exit) */
unsigned long __hc_ktime_get_ns(void);

/* Probe-core trap points (entry.S). */
void jprobe_return(void);
void cpu_idle(void);
void kretprobe_trampoline(void);

/* lib.c */
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
void *memset(void *s, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* printk.c */
#define PRINTK_BUF_SIZE 256
int printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* kernel.c: the probe targets and helpers. */
extern long last_pid;
extern unsigned long watched_counter;
extern unsigned long target_return_address[2];

long do_fork(unsigned long clone_flags, unsigned long stack_start, void *regs,
	     unsigned long stack_size, int *parent_tidptr, int *child_tidptr);
long fork_loop(long n);
long fork_schedule_loop(long n);
long do_sys_open(int dfd, const char *filename, int flags, int mode);
long sys_open(const char *filename, int flags, int mode);
long open_loop(long n, long fail_every);
long vfs_read(void *file, char *buf, unsigned long count, long *pos);
int tcp_v4_rcv(void *skb);

unsigned long kprobe_target(unsigned long v);
unsigned long kprobe_target2(unsigned long v);
long kprobe_recursed_target(void);
unsigned long stacktrace_driver(void);
unsigned long stacktrace_target(void);
unsigned long stacktrace_internal_target(void);
unsigned long fib(unsigned long n);

long msleep(unsigned long ms);
long sleepy(unsigned long ms);
void schedule(void);
void do_exit(long code);
long exit_inside(long code);
unsigned long ktime_get_ns(void);

void spin_lock(int *lock);
void spin_unlock(int *lock);
long locked_inc(int *lock, long *counter, long n);

long bench_loop(long n);
long bench_target(long x);

long do_page_fault(void *regs, unsigned long error_code);
int notifier_call_chain(void *nl, unsigned long val, void *v);
void *__switch_to(void *prev, void *next);

long jprobe_stackargs_target(long a, long b, long c, long d, long e,
			     long f, long g, long h, long i, long j);
long jprobe_stackargs_caller(long base);
long jprobe_scribble_handler(long a, long b, long c, long d, long e,
			     long f, long g, long h, long i, long j);
long jdo_fork(unsigned long clone_flags, unsigned long stack_start, void *regs,
	      unsigned long stack_size, int *parent_tidptr, int *child_tidptr);

long printk_test(long x);
long null_deref(void);
long infinite_loop(void);
long bad_insn(void);
long text_poke_victim(long x);

#endif /* SMPK_KERNEL_H */
