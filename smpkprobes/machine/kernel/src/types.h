/* SPDX-License-Identifier: MIT */
/*
 * Freestanding basic types for the smpkprobes guest kernel.
 *
 * We build with -nostdinc, so nothing comes from libc or the compiler's
 * resource directory; everything the guest needs is declared here.
 */
#ifndef SMPK_TYPES_H
#define SMPK_TYPES_H

typedef unsigned char      u8;
typedef unsigned short     u16;
typedef unsigned int       u32;
typedef unsigned long long u64;
typedef signed char        s8;
typedef short              s16;
typedef int                s32;
typedef long long          s64;

typedef __SIZE_TYPE__      size_t;
typedef __PTRDIFF_TYPE__   ptrdiff_t;
typedef __UINTPTR_TYPE__   uintptr_t;

typedef __builtin_va_list  va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type)   __builtin_va_arg(ap, type)
#define va_end(ap)         __builtin_va_end(ap)

#define NULL ((void *)0)

#endif /* SMPK_TYPES_H */
