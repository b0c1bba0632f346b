/* The trace's digest fold in C (smpkprobes/machine/_tracefold.py says what it does and why
 * it exists).  An optional extension: where it cannot be built, the Python twin in
 * _tracefold.py computes the same bytes, slower.
 *
 * fold(events) -> bytes: the concatenation of repr(event).encode() for every event of the
 * list, exactly.  Events are tuples of plain ints and short ASCII strings almost always;
 * those are written here directly.  Anything else (another type, a string repr would
 * escape or quote differently, an int wider than 64 bits) is handed to repr() itself. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} out_t;

static int
out_reserve(out_t *o, Py_ssize_t more)
{
    if (o->len + more <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more)
        cap *= 2;
    char *b = PyMem_Realloc(o->buf, cap);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = b;
    o->cap = cap;
    return 0;
}

static int
out_put(out_t *o, const char *s, Py_ssize_t n)
{
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    return 0;
}

/* repr(obj), UTF-8 encoded, as Python writes it. */
static int
put_repr(out_t *o, PyObject *obj)
{
    PyObject *r = PyObject_Repr(obj);
    if (r == NULL)
        return -1;
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(r, &n);
    int err = s == NULL ? -1 : out_put(o, s, n);
    Py_DECREF(r);
    return err;
}

/* The decimal digits of v, sign first if negative (snprintf costs several times this). */
static int
put_decimal(out_t *o, unsigned long long v, int negative)
{
    char tmp[24];
    int i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (negative)
        tmp[--i] = '-';
    return out_put(o, tmp + i, sizeof tmp - i);
}

/* One item of a tuple written directly: 1 done, 0 not a plain item (use repr), -1 error. */
static int
put_plain(out_t *o, PyObject *x)
{
    if (PyLong_CheckExact(x)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
        if (overflow == 0) {
            if (v == -1 && PyErr_Occurred())
                return -1;
            unsigned long long m = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
            return put_decimal(o, m, v < 0) < 0 ? -1 : 1;
        }
        /* Positive and wider than 63 bits (a kernel address): the mask is the value when
         * it fits in 64 bits (PyLong_AsUnsignedLongLong would go through a byte array). */
        if (overflow > 0 && _PyLong_NumBits(x) <= 64)
            return put_decimal(o, PyLong_AsUnsignedLongLongMask(x), 0) < 0 ? -1 : 1;
        PyErr_Clear();
        return 0;
    }
    if (PyUnicode_CheckExact(x) && PyUnicode_IS_ASCII(x)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(x);
        const char *s = (const char *)PyUnicode_1BYTE_DATA(x);
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned char c = s[i];
            if (c < 0x20 || c >= 0x7f || c == '\'' || c == '\\')
                return 0;               /* escaped or quoted otherwise: repr() decides */
        }
        if (out_reserve(o, n + 2) < 0)
            return -1;
        o->buf[o->len++] = '\'';
        memcpy(o->buf + o->len, s, n);
        o->len += n;
        o->buf[o->len++] = '\'';
        return 1;
    }
    if (x == Py_None)
        return out_put(o, "None", 4) < 0 ? -1 : 1;
    if (x == Py_True)
        return out_put(o, "True", 4) < 0 ? -1 : 1;
    if (x == Py_False)
        return out_put(o, "False", 5) < 0 ? -1 : 1;
    return 0;
}

/* One event: a plain tuple written item by item, anything else through repr(). */
static int
put_event(out_t *o, PyObject *ev)
{
    if (!PyTuple_CheckExact(ev) || PyTuple_GET_SIZE(ev) == 0)
        return put_repr(o, ev);
    Py_ssize_t mark = o->len, n = PyTuple_GET_SIZE(ev);
    if (out_put(o, "(", 1) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && out_put(o, ", ", 2) < 0)
            return -1;
        int r = put_plain(o, PyTuple_GET_ITEM(ev, i));
        if (r < 0)
            return -1;
        if (r == 0) {
            o->len = mark;              /* start again: the whole event through repr() */
            return put_repr(o, ev);
        }
    }
    return out_put(o, n == 1 ? ",)" : ")", n == 1 ? 2 : 1);
}

static PyObject *
fold(PyObject *self, PyObject *events)
{
    PyObject *seq = PySequence_Fast(events, "fold() takes a sequence of events");
    if (seq == NULL)
        return NULL;
    out_t o = {NULL, 0, 0};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (put_event(&o, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            PyMem_Free(o.buf);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    PyObject *res = PyBytes_FromStringAndSize(o.buf ? o.buf : "", o.len);
    PyMem_Free(o.buf);
    return res;
}

static PyMethodDef methods[] = {
    {"fold", fold, METH_O,
     "fold(events) -> bytes: b''.join(repr(e).encode() for e in events), fast."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tracefold_native",
    "The trace digest's fold in C (see smpkprobes/machine/_tracefold.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__tracefold_native(void)
{
    return PyModule_Create(&module);
}
