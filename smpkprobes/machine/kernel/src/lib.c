// SPDX-License-Identifier: MIT
/*
 * Minimal string and formatting helpers for the guest kernel.
 *
 * vsnprintf() understands:
 *   flags      '-' (left-justify), '0' (zero-pad), '#' (0x prefix for %x)
 *   width      decimal digits or '*'
 *   precision  '.N' or '.*' (only limits %s)
 *   length     hh h l ll z
 *   conversion d i u x X p s c %
 * Like Linux before pointer hashing, %p prints the bare hex value zero-padded
 * to the pointer width (16 digits on 64-bit) when no width is given, so
 * "0x%p" is the idiomatic way to get a prefixed pointer.
 * The return value is the length the full output would have had; the buffer
 * is always NUL-terminated when size > 0.
 */
#include "kernel.h"

size_t strlen(const char *s)
{
	const char *p = s;

	while (*p)
		p++;
	return p - s;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

/*
 * clang may emit calls to memset/memcpy/memmove/memcmp for aggregate copies
 * even when freestanding, so they must exist.  -fno-builtin keeps these
 * loops from being "optimised" back into calls to themselves.
 */
void *memset(void *s, int c, size_t n)
{
	u8 *p = s;

	while (n--)
		*p++ = (u8)c;
	return s;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;

	if (d <= s || d >= s + n) {
		while (n--)
			*d++ = *s++;
	} else {
		d += n;
		s += n;
		while (n--)
			*--d = *--s;
	}
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

/*
 * Output cursor: counts every character, stores those that fit.  The static
 * helpers below stay out of line (the build inlines only always_inline
 * functions); that is fine for a debug console.
 */
struct outbuf {
	char *buf;
	size_t size;
	size_t pos;
};

static void out_char(struct outbuf *o, char c)
{
	if (o->pos + 1 < o->size)
		o->buf[o->pos] = c;
	o->pos++;
}

static void out_pad(struct outbuf *o, char c, int n)
{
	while (n-- > 0)
		out_char(o, c);
}

#define F_LEFT  0x01
#define F_ZERO  0x02
#define F_ALT   0x04
#define F_UPPER 0x08

static void out_number(struct outbuf *o, u64 val, unsigned base,
		       int negative, int width, unsigned flags)
{
	const char *digits = (flags & F_UPPER) ? "0123456789ABCDEF"
					       : "0123456789abcdef";
	char tmp[24];		/* 2^64 needs 20 decimal / 16 hex digits */
	int n = 0, len;

	do {
		tmp[n++] = digits[val % base];
		val /= base;
	} while (val);

	len = n + (negative ? 1 : 0) + ((flags & F_ALT) ? 2 : 0);

	if (!(flags & (F_LEFT | F_ZERO)))
		out_pad(o, ' ', width - len);
	if (negative)
		out_char(o, '-');
	if (flags & F_ALT) {
		out_char(o, '0');
		out_char(o, (flags & F_UPPER) ? 'X' : 'x');
	}
	/* Zero padding goes between the sign/prefix and the digits. */
	if ((flags & F_ZERO) && !(flags & F_LEFT))
		out_pad(o, '0', width - len);
	while (n)
		out_char(o, tmp[--n]);
	if (flags & F_LEFT)
		out_pad(o, ' ', width - len);
}

static void out_string(struct outbuf *o, const char *s, int width,
		       int prec, unsigned flags)
{
	int len;

	if (!s)
		s = "(null)";
	len = (int)strnlen(s, prec < 0 ? (size_t)-1 : (size_t)prec);
	if (!(flags & F_LEFT))
		out_pad(o, ' ', width - len);
	for (int i = 0; i < len; i++)
		out_char(o, s[i]);
	if (flags & F_LEFT)
		out_pad(o, ' ', width - len);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct outbuf o = { .buf = buf, .size = size, .pos = 0 };

	while (*fmt) {
		const char *spec = fmt;
		unsigned flags = 0;
		int width = 0, prec = -1, lng = 0;	/* lng: -2 hh, -1 h, 1 l, 2 ll */
		unsigned base = 10;
		int is_signed = 0;
		u64 uval;
		s64 sval;

		if (*fmt != '%') {
			out_char(&o, *fmt++);
			continue;
		}
		fmt++;

		for (;; fmt++) {
			if (*fmt == '-')
				flags |= F_LEFT;
			else if (*fmt == '0')
				flags |= F_ZERO;
			else if (*fmt == '#')
				flags |= F_ALT;
			else
				break;
		}

		if (*fmt == '*') {
			width = va_arg(ap, int);
			if (width < 0) {
				flags |= F_LEFT;
				width = -width;
			}
			fmt++;
		} else {
			while (*fmt >= '0' && *fmt <= '9')
				width = width * 10 + (*fmt++ - '0');
		}

		if (*fmt == '.') {
			fmt++;
			prec = 0;
			if (*fmt == '*') {
				prec = va_arg(ap, int);
				fmt++;
			} else {
				while (*fmt >= '0' && *fmt <= '9')
					prec = prec * 10 + (*fmt++ - '0');
			}
		}

		if (*fmt == 'h') {
			lng = -1;
			if (*++fmt == 'h') {
				lng = -2;
				fmt++;
			}
		} else if (*fmt == 'l') {
			lng = 1;
			if (*++fmt == 'l') {
				lng = 2;
				fmt++;
			}
		} else if (*fmt == 'z') {
			lng = 1;	/* size_t is unsigned long on all our targets */
			fmt++;
		}

		switch (*fmt) {
		case 'd':
		case 'i':
			is_signed = 1;
			break;
		case 'u':
			break;
		case 'X':
			flags |= F_UPPER;
			/* fall through */
		case 'x':
			base = 16;
			break;
		case 'p':
			if (!width) {
				width = 2 * sizeof(void *);
				flags |= F_ZERO;
			}
			out_number(&o, (uintptr_t)va_arg(ap, void *), 16, 0,
				   width, flags & ~F_UPPER);
			fmt++;
			continue;
		case 's':
			out_string(&o, va_arg(ap, const char *), width, prec, flags);
			fmt++;
			continue;
		case 'c':
			flags &= ~F_ZERO;
			out_pad(&o, ' ', (flags & F_LEFT) ? 0 : width - 1);
			out_char(&o, (char)va_arg(ap, int));
			out_pad(&o, ' ', (flags & F_LEFT) ? width - 1 : 0);
			fmt++;
			continue;
		case '%':
			out_char(&o, '%');
			fmt++;
			continue;
		default:
			/* Unknown or truncated conversion: print it verbatim. */
			while (spec < fmt)
				out_char(&o, *spec++);
			if (*fmt)
				out_char(&o, *fmt++);
			continue;
		}
		fmt++;

		/* Fetch the integer argument with the right width and sign. */
		if (is_signed) {
			if (lng == 2)
				sval = va_arg(ap, long long);
			else if (lng == 1)
				sval = va_arg(ap, long);
			else
				sval = va_arg(ap, int);
			if (lng == -1)
				sval = (short)sval;
			else if (lng == -2)
				sval = (signed char)sval;
			/* Negate as unsigned so LLONG_MIN is handled. */
			uval = sval < 0 ? -(u64)sval : (u64)sval;
			out_number(&o, uval, base, sval < 0, width, flags & ~F_ALT);
		} else {
			if (lng == 2)
				uval = va_arg(ap, unsigned long long);
			else if (lng == 1)
				uval = va_arg(ap, unsigned long);
			else
				uval = va_arg(ap, unsigned int);
			if (lng == -1)
				uval = (unsigned short)uval;
			else if (lng == -2)
				uval = (unsigned char)uval;
			if (base != 16)
				flags &= ~F_ALT;
			out_number(&o, uval, base, 0, width, flags);
		}
	}

	if (size)
		buf[o.pos < size ? o.pos : size - 1] = '\0';
	return (int)o.pos;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
