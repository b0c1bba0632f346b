/* The block budget's UC_HOOK_BLOCK callback in C (smpkprobes/machine/_blockbudget.py says
 * what it does and why it exists).  An optional extension: where it cannot be built, the
 * Python twin in _blockbudget.py runs the same semantics, slower.
 *
 * Python only loads the module and reads CALLBACK, the callback's address; Unicorn calls
 * the callback directly, with a BudgetCtx (_blockbudget.py) as user_data.  No Unicorn
 * header or library is needed: the context carries uc_emu_stop's address. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    int64_t budget;             /* instructions left; <= 0: stop before this block */
    const uint8_t *starts;      /* InsnStarts: 1 where an instruction starts */
    uint64_t limit;             /* blocks at or past this address count 1 */
    uint32_t *cache;            /* per start address: size (low 16 bits) | count << 16 */
    int (*stop)(void *uc);      /* uc_emu_stop */
} budget_ctx;

static void
block_budget(void *uc, uint64_t addr, uint32_t size, void *user_data)
{
    budget_ctx *ctx = user_data;
    uint32_t n = 1;

    if (ctx->budget <= 0) {
        ctx->stop(uc);          /* the block does not run; the next quantum starts with it */
        return;
    }
    if (size != 0 && addr < ctx->limit) {
        uint32_t cached = ctx->cache[addr];
        if ((uint16_t)cached == (uint16_t)size) {
            n = cached >> 16;
        } else {
            const uint8_t *p = ctx->starts + addr;
            n = 0;
            for (uint32_t i = 0; i < size; i++)
                n += p[i];
            if (n == 0)
                n = 1;          /* a block the map knows nothing of counts one */
            ctx->cache[addr] = n << 16 | (uint16_t)size;
        }
    }
    ctx->budget -= n;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockbudget_native",
    "The block budget's UC_HOOK_BLOCK callback (CALLBACK: its address).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__blockbudget_native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "CALLBACK", PyLong_FromVoidPtr((void *)block_budget)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
