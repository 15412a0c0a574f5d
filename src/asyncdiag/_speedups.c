/* asyncdiag's hot paths in C: the asyncgen tracker's first-iteration hook (FirstIterHook) and,
 * on 3.10/3.11, the running-loop lookup (running_loop, further down).
 *
 * CPython calls the thread's firstiter hook once for every async generator of the program.
 * The Python version of this hook (``_asyncgens._Chain.make_firstiter``) is the reference and
 * the fallback when this module is not built; this one does the same, step for step, without
 * the cost of a Python frame, its bytecode and ``sys._getframe``'s audit event: 1,129
 * instructions per generator on 3.11 against 3,403 (benchmarks/bench_asyncgens.py).
 *
 * Used only under a loop's own hooks (asyncio's or uvloop's), whose weak set of generators
 * answers liveness, so the entry holds no weak reference:
 *
 *     first(agen)                          # the loop's hook: its exceptions propagate
 *     if tracker.enabled:
 *         try:
 *             frame = <the frame that called __anext__>
 *             code, lasti = frame.f_code, frame.f_lasti, or tracker.locate(frame)
 *             task = current_task(loop)
 *             registry[id(agen)] = (None, chain, code, lasti, task and task.get_name())
 *             if len(registry) >= tracker.prune_at: tracker.prune()
 *
 * with one difference nothing can observe: a dead generator's entry that only the registry
 * holds is rewritten in place rather than replaced (see rewrite_entry).
 *         except Exception as exc:
 *             tracker.failed(exc)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <structmember.h>
#if PY_VERSION_HEX < 0x030C0000
#include <pthread.h>
#include <string.h>
#include <unistd.h>
#endif

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *first;        /* the loop's own firstiter hook */
    PyObject *tracker;      /* AsyncgenTracker: locate(), prune(), failed() */
    PyObject *tracker_dict; /* its __dict__: enabled and prune_at, read per generator */
    PyObject *registry;     /* dict: id(agen) -> entry */
    PyObject *skip_cache;   /* dict: filename -> True if asyncio/contextlib/asyncdiag */
    PyObject *chain;        /* the _Chain, stored in every entry */
    PyObject *loop;
    PyObject *current_task; /* callable(loop) -> task or None, or a dict {loop: task} */
    PyObject *user_code;    /* the last code object found to be the program's, or NULL */
} FirstIterHook;

static PyObject *str_enabled, *str_prune_at, *str_locate, *str_prune, *str_failed,
    *str_get_name;

static int
frame_lasti(PyFrameObject *frame)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(frame);
#else
    /* 3.10 counts code units; f_lasti (and 3.11+) count bytes. */
    return frame->f_lasti < 0 ? -1 : frame->f_lasti * (int)sizeof(_Py_CODEUNIT);
#endif
}

/* Sets *code (new reference, or None) and *lasti for the frame that iterated. */
static int
locate(FirstIterHook *self, PyObject **code, long *lasti)
{
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    if (frame == NULL) { /* iterated from C code with no Python frame */
        *code = Py_NewRef(Py_None);
        *lasti = -1;
        return 0;
    }
    PyCodeObject *frame_code = PyFrame_GetCode(frame); /* new reference */
    if ((PyObject *)frame_code != self->user_code) {
        PyObject *is_infra = PyDict_GetItemWithError(self->skip_cache,
                                                     frame_code->co_filename);
        if (is_infra != Py_False) {
            Py_DECREF(frame_code);
            if (is_infra == NULL && PyErr_Occurred()) {
                return -1;
            }
            /* A file seen for the first time, or iteration driven by asyncio/contextlib. */
            PyObject *found = PyObject_CallMethodOneArg(self->tracker, str_locate,
                                                        (PyObject *)frame);
            if (found == NULL) {
                return -1;
            }
            if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2) {
                Py_DECREF(found);
                PyErr_SetString(PyExc_TypeError, "locate() must return (code, lasti)");
                return -1;
            }
            *lasti = PyLong_AsLong(PyTuple_GET_ITEM(found, 1));
            if (*lasti == -1 && PyErr_Occurred()) {
                Py_DECREF(found);
                return -1;
            }
            *code = Py_NewRef(PyTuple_GET_ITEM(found, 0));
            Py_DECREF(found);
            return 0;
        }
        Py_XSETREF(self->user_code, Py_NewRef((PyObject *)frame_code));
    }
    *code = (PyObject *)frame_code;
    *lasti = frame_lasti(frame);
    return 0;
}

/* Puts value at index i of a tuple nobody else holds, if it is not already there. */
static void
replace_item(PyObject *tuple, Py_ssize_t i, PyObject *value)
{
    PyObject *previous = PyTuple_GET_ITEM(tuple, i);
    if (previous != value) {
        PyTuple_SET_ITEM(tuple, i, Py_NewRef(value));
        Py_DECREF(previous); /* a code object, an int, a str or None: runs no Python code */
    }
}

/* Generators die at a few reused addresses, so most first iterations find the entry of a
 * dead generator under their key. When only the registry holds that entry, and it is one of
 * this chain's, it is rewritten in place instead of replaced: no tuple made and freed, no dict
 * store, and the registry does not grow, so no prune check either. Nothing can observe the
 * difference: a prune that is classifying entries holds references to them (so the count is
 * above 1 and a new tuple is stored, which the prune's identity check then sees). Returns 1
 * if the entry was rewritten, 0 if a new one must be stored, -1 on error. */
static int
rewrite_entry(FirstIterHook *self, PyObject *key, PyObject *code, long lasti, PyObject *name)
{
    if (!PyDict_CheckExact(self->registry)) {
        return 0; /* a subclass may override __setitem__: always store through it */
    }
    PyObject *old = PyDict_GetItemWithError(self->registry, key); /* borrowed */
    if (old == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_CheckExact(old) || Py_REFCNT(old) != 1 || PyTuple_GET_SIZE(old) != 5
        || PyTuple_GET_ITEM(old, 0) != Py_None || PyTuple_GET_ITEM(old, 1) != self->chain) {
        return 0;
    }
    PyObject *old_lasti = PyTuple_GET_ITEM(old, 3);
    if (!PyLong_CheckExact(old_lasti)) {
        return 0;
    }
    long previous = PyLong_AsLong(old_lasti);
    if (previous == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (previous != lasti) {
        PyObject *value = PyLong_FromLong(lasti);
        if (value == NULL) {
            return -1;
        }
        PyTuple_SET_ITEM(old, 3, value);
        Py_DECREF(old_lasti);
    }
    replace_item(old, 2, code);
    replace_item(old, 4, name);
    return 1;
}

/* tracker.<name> (new reference), looked up in the instance dict: one dict lookup instead of
 * a generic attribute lookup, for the two attributes read per generator. */
static PyObject *
tracker_attribute(FirstIterHook *self, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(self->tracker_dict, name);
    if (value == NULL) {
        return PyErr_Occurred() ? NULL : PyObject_GetAttr(self->tracker, name);
    }
    return Py_NewRef(value);
}

static int
record(FirstIterHook *self, PyObject *agen)
{
    PyObject *code = NULL, *task = NULL, *name = NULL, *entry = NULL, *key = NULL,
             *lasti_value = NULL, *prune_at = NULL;
    long lasti;
    int status = -1;

    if (locate(self, &code, &lasti) < 0) {
        goto done;
    }
    if (PyDict_CheckExact(self->current_task)) {
        /* Before 3.12: asyncio's own table of running tasks (current_task() reads it). */
        task = PyDict_GetItemWithError(self->current_task, self->loop);
        if (task == NULL && PyErr_Occurred()) {
            goto done;
        }
        task = Py_NewRef(task != NULL ? task : Py_None);
    }
    else {
        task = PyObject_CallOneArg(self->current_task, self->loop);
        if (task == NULL) {
            goto done;
        }
    }
    if (task == Py_None) {
        name = Py_NewRef(Py_None);
    }
    else {
        name = PyObject_CallMethodNoArgs(task, str_get_name);
        if (name == NULL) {
            goto done;
        }
    }
    key = PyLong_FromVoidPtr(agen); /* id(agen) */
    if (key == NULL) {
        goto done;
    }
    int rewritten = rewrite_entry(self, key, code, lasti, name);
    if (rewritten != 0) {
        status = rewritten < 0 ? -1 : 0;
        goto done;
    }
    lasti_value = PyLong_FromLong(lasti);
    if (lasti_value == NULL) {
        goto done;
    }
    entry = PyTuple_Pack(5, Py_None, self->chain, code, lasti_value, name);
    /* Through the mapping protocol: the registry may be a dict subclass (tests make one fail). */
    if (entry == NULL || PyObject_SetItem(self->registry, key, entry) < 0) {
        goto done;
    }
    prune_at = tracker_attribute(self, str_prune_at);
    if (prune_at == NULL) {
        goto done;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(prune_at);
    if (limit == -1 && PyErr_Occurred()) {
        goto done;
    }
    if (PyDict_GET_SIZE(self->registry) >= limit) {
        PyObject *result = PyObject_CallMethodNoArgs(self->tracker, str_prune);
        if (result == NULL) {
            goto done;
        }
        Py_DECREF(result);
    }
    status = 0;
done:
    Py_XDECREF(code);
    Py_XDECREF(task);
    Py_XDECREF(name);
    Py_XDECREF(entry);
    Py_XDECREF(key);
    Py_XDECREF(lasti_value);
    Py_XDECREF(prune_at);
    return status;
}

/* An internal error goes to tracker.failed(exc) (which turns tracking off and logs it);
 * only a BaseException that is not an Exception (KeyboardInterrupt...) propagates, as it
 * would from the Python hook. */
static PyObject *
report_failure(FirstIterHook *self)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return NULL;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *exc = value;
    Py_XDECREF(type);
    Py_XDECREF(traceback);
#endif
    PyObject *result = PyObject_CallMethodOneArg(self->tracker, str_failed,
                                                 exc != NULL ? exc : Py_None);
    Py_XDECREF(exc);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyObject *
hook_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FirstIterHook *self = (FirstIterHook *)op;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "firstiter hook takes exactly one argument");
        return NULL;
    }
    PyObject *agen = args[0];
    /* Exactly the call the thread would have made without asyncdiag. */
    PyObject *result = PyObject_CallOneArg(self->first, agen);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);

    PyObject *enabled = tracker_attribute(self, str_enabled);
    if (enabled == NULL) {
        return report_failure(self);
    }
    int on = PyObject_IsTrue(enabled);
    Py_DECREF(enabled);
    if (on < 0) {
        return report_failure(self);
    }
    if (on && record(self, agen) < 0) {
        return report_failure(self);
    }
    Py_RETURN_NONE;
}

static PyObject *
hook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"first", "tracker", "registry", "skip_cache", "chain", "loop",
                             "current_task", NULL};
    PyObject *first, *tracker, *registry, *skip_cache, *chain, *loop, *current_task;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!O!OOO:FirstIterHook", kwlist, &first,
                                     &tracker, &PyDict_Type, &registry, &PyDict_Type,
                                     &skip_cache, &chain, &loop, &current_task)) {
        return NULL;
    }
    FirstIterHook *self = (FirstIterHook *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = hook_vectorcall;
    self->first = Py_NewRef(first);
    self->tracker = Py_NewRef(tracker);
    self->tracker_dict = PyObject_GenericGetDict(tracker, NULL);
    if (self->tracker_dict == NULL || !PyDict_Check(self->tracker_dict)) {
        PyErr_Clear();
        Py_CLEAR(self->tracker_dict);
        self->tracker_dict = PyDict_New(); /* empty: every lookup falls back to getattr */
        if (self->tracker_dict == NULL) {
            Py_DECREF(self);
            return NULL;
        }
    }
    self->registry = Py_NewRef(registry);
    self->skip_cache = Py_NewRef(skip_cache);
    self->chain = Py_NewRef(chain);
    self->loop = Py_NewRef(loop);
    self->current_task = Py_NewRef(current_task);
    self->user_code = NULL;
    return (PyObject *)self;
}

static int
hook_traverse(FirstIterHook *self, visitproc visit, void *arg)
{
    Py_VISIT(self->first);
    Py_VISIT(self->tracker);
    Py_VISIT(self->tracker_dict);
    Py_VISIT(self->registry);
    Py_VISIT(self->skip_cache);
    Py_VISIT(self->chain);
    Py_VISIT(self->loop);
    Py_VISIT(self->current_task);
    Py_VISIT(self->user_code);
    return 0;
}

static int
hook_clear(FirstIterHook *self)
{
    Py_CLEAR(self->first);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->tracker_dict);
    Py_CLEAR(self->registry);
    Py_CLEAR(self->skip_cache);
    Py_CLEAR(self->chain);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->current_task);
    Py_CLEAR(self->user_code);
    return 0;
}

static void
hook_dealloc(FirstIterHook *self)
{
    PyObject_GC_UnTrack(self);
    hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef hook_members[] = {
    /* _asyncgens._chain_of() finds the chain behind an installed hook through this name. */
    {"_asyncdiag_chain", T_OBJECT, offsetof(FirstIterHook, chain), READONLY, NULL},
    {NULL},
};

static PyTypeObject FirstIterHookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncdiag._speedups.FirstIterHook",
    .tp_doc = "The asyncgen tracker's firstiter hook under a loop's own hooks "
              "(see _asyncgens._Chain.make_firstiter, its Python equivalent).",
    .tp_basicsize = sizeof(FirstIterHook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = hook_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FirstIterHook, vectorcall),
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_clear = (inquiry)hook_clear,
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_members = hook_members,
};

#if PY_VERSION_HEX < 0x030C0000
/* running_loop(): asyncio's _get_running_loop() without its getpid() system call (3.10/3.11).
 *
 * Up to 3.11, asyncio's C accelerator keeps the running loop in a holder object stored in the
 * thread state's dict, with the pid that set it, and checks that pid against getpid() on
 * every call so that a forked child does not see its parent's loop. The system call is most
 * of the function's cost (about 200 ns here against 6 ns for the whole call on 3.13, which
 * checks the pid at fork time instead), and the instrumentation asks for the running loop on
 * every measured __aexit__ that can be cancelled and every traced block. This reads the same
 * holder and compares its pid with ours, which is refreshed in a forked child by a
 * pthread_atfork handler, as 3.12 does.
 *
 * The holder's layout is private to Modules/_asynciomodule.c (unchanged from 3.7 to 3.11,
 * whose sources are frozen): it is trusted only for an object whose type has the holder's
 * name and size, and _loops uses this function only where asyncio's _get_running_loop is the
 * C accelerator's (which is what stores the holder), after checking that both agree. */
typedef struct {
    PyObject_HEAD
    PyObject *rl_loop;
    pid_t rl_pid;
} RunningLoopHolder;

static pid_t current_pid;
static PyObject *str_running_loop_key;

static void
refresh_pid(void)
{
    current_pid = getpid();
}

static PyObject *
running_loop(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    PyObject *ts_dict = PyThreadState_GetDict(); /* borrowed */
    if (ts_dict == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *holder = PyDict_GetItemWithError(ts_dict, str_running_loop_key); /* borrowed */
    if (holder == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE; /* no loop has run in this thread */
    }
    PyTypeObject *type = Py_TYPE(holder);
    if (type->tp_basicsize != (Py_ssize_t)sizeof(RunningLoopHolder)
            || strcmp(type->tp_name, "_RunningLoopHolder") != 0) {
        PyErr_SetString(PyExc_RuntimeError,
                        "asyncio's running-loop holder is not the expected one");
        return NULL;
    }
    RunningLoopHolder *running = (RunningLoopHolder *)holder;
    if (running->rl_loop == Py_None || running->rl_pid != current_pid) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(running->rl_loop);
}
#endif

/* record_since(series, t0) -> duration: the instrumentation's metrics step after an awaited
 * __aenter__/__aexit__, as one call instead of five Python operations:
 *
 *     duration = time.perf_counter() - t0
 *     series.append(duration)
 *     if len(series) >= series.limit:
 *         series.histogram.fold(series)
 *     return duration
 *
 * series is a _telemetry.Series (a list). The clock is perf_counter's own. */
static PyObject *str_limit, *str_histogram, *str_fold;

static PyObject *
record_since(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "record_since(series: list, t0: float)");
        return NULL;
    }
    PyObject *series = args[0];
    double t0 = PyFloat_AsDouble(args[1]);
    if (t0 == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t now;
    if (PyTime_PerfCounter(&now) < 0) {
        return NULL;
    }
    PyObject *duration = PyFloat_FromDouble(PyTime_AsSecondsDouble(now) - t0);
#else
    PyObject *duration = PyFloat_FromDouble(
        _PyTime_AsSecondsDouble(_PyTime_GetPerfCounter()) - t0);
#endif
    if (duration == NULL || PyList_Append(series, duration) < 0) {
        Py_XDECREF(duration);
        return NULL;
    }
    PyObject *limit = PyObject_GetAttr(series, str_limit);
    if (limit == NULL) {
        Py_DECREF(duration);
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(limit);
    Py_DECREF(limit);
    if (at == -1 && PyErr_Occurred()) {
        Py_DECREF(duration);
        return NULL;
    }
    if (PyList_GET_SIZE(series) >= at) {
        PyObject *histogram = PyObject_GetAttr(series, str_histogram);
        PyObject *folded = histogram == NULL ? NULL
            : PyObject_CallMethodOneArg(histogram, str_fold, series);
        Py_XDECREF(histogram);
        if (folded == NULL) {
            Py_DECREF(duration);
            return NULL;
        }
        Py_DECREF(folded);
    }
    return duration;
}

static PyMethodDef speedups_functions[] = {
    {"record_since", (PyCFunction)(void (*)(void))record_since, METH_FASTCALL,
     "Append perf_counter() - t0 to a metrics series, folding it when full; "
     "return the duration."},
#if PY_VERSION_HEX < 0x030C0000
    {"running_loop", running_loop, METH_NOARGS,
     "asyncio's _get_running_loop() without a getpid() system call (3.10/3.11)."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asyncdiag._speedups",
    .m_doc = "Optional C versions of asyncdiag's hot paths.",
    .m_size = -1,
    .m_methods = speedups_functions,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL;
    INTERN(str_enabled, "enabled");
    INTERN(str_prune_at, "prune_at");
    INTERN(str_locate, "locate");
    INTERN(str_prune, "prune");
    INTERN(str_failed, "failed");
    INTERN(str_get_name, "get_name");
    INTERN(str_limit, "limit");
    INTERN(str_histogram, "histogram");
    INTERN(str_fold, "fold");
#if PY_VERSION_HEX < 0x030C0000
    INTERN(str_running_loop_key, "__asyncio_running_event_loop__");
#endif
#undef INTERN
    if (PyType_Ready(&FirstIterHookType) < 0) {
        return NULL;
    }
#if PY_VERSION_HEX < 0x030C0000
    refresh_pid();
    if (pthread_atfork(NULL, NULL, refresh_pid) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
#endif
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&FirstIterHookType);
    if (PyModule_AddObject(module, "FirstIterHook", (PyObject *)&FirstIterHookType) < 0) {
        Py_DECREF(&FirstIterHookType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
