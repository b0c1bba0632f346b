/* A code hook's dispatch in C (smpkprobes/machine/_codehook.py says what it does and why).
 * An optional extension: where it cannot be built, the ctypes twin in _codehook.py runs
 * the same protocol, slower.
 *
 * Unicorn calls code_hook() directly with a HookCtx (_codehook.py) as user_data:
 *     stop = callback(addr)             (an exception: stop = on_error(exception))
 *     if stop: on_stop()
 * No Unicorn header or library is needed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject *callback;         /* callback(addr) -> truthy to end the quantum now */
    PyObject *on_error;         /* on_error(exception) -> the same */
    PyObject *on_stop;          /* on_stop() */
} hook_ctx;

static int
call_on_error(hook_ctx *ctx)
{
    PyObject *type, *value, *tb, *res;
    int stop;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    res = PyObject_CallOneArg(ctx->on_error, value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (res == NULL) {          /* on_error itself failed: nothing is left to tell */
        PyErr_WriteUnraisable(ctx->on_error);
        return 1;
    }
    stop = PyObject_IsTrue(res);
    Py_DECREF(res);
    return stop != 0;
}

static void
code_hook(void *uc, uint64_t addr, uint32_t size, void *user_data)
{
    hook_ctx *ctx = user_data;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *arg = PyLong_FromUnsignedLongLong(addr);
    PyObject *res = arg != NULL ? PyObject_CallOneArg(ctx->callback, arg) : NULL;
    int stop;

    (void)uc;
    (void)size;
    Py_XDECREF(arg);
    if (res == NULL) {
        stop = call_on_error(ctx);
    } else {
        stop = res != Py_None && res != Py_False && PyObject_IsTrue(res) != 0;
        Py_DECREF(res);
    }
    if (stop) {
        res = PyObject_CallNoArgs(ctx->on_stop);
        if (res == NULL)
            PyErr_WriteUnraisable(ctx->on_stop);
        Py_XDECREF(res);
    }
    PyGILState_Release(gil);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_codehook_native",
    "A code hook's dispatch (CALLBACK: its address).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__codehook_native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "CALLBACK", PyLong_FromVoidPtr((void *)code_hook)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
