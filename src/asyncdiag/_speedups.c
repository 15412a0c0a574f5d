/* asyncdiag's hot paths in C, each with a Python reference that is also its fallback when the
 * extension is not built (tests run both):
 *
 *   FirstIterHook   the asyncgen tracker's first-iteration hook   (_asyncgens, this part below)
 *   running_loop    3.10/3.11 running-loop lookup without getpid() (_loops)
 *   record_since    one awaited duration into a metrics series     (_telemetry)
 *   fold_into       a series' durations into its histogram point   (_telemetry)
 *   BlockOps, Block a traced async with's bookkeeping              (_proxies._open_span...)
 *   CountedBase     counted generator requests                     (_proxies._CountedRequests)
 *   MeasuredDunder, an instrumented __aenter__/__aexit__ without    (_proxies.make_cm_methods)
 *   MeasuredAwait   a wrapper coroutine
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
#include <math.h>
/* running_loop() below: 3.10/3.11, where asyncio checks the pid (not on Windows, which has no
 * fork and whose holder has no pid). */
#if PY_VERSION_HEX < 0x030C0000 && !defined(MS_WINDOWS)
#define ASYNCDIAG_RUNNING_LOOP 1
#endif
#ifdef ASYNCDIAG_RUNNING_LOOP
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

/* The task running on loop (new reference; None if none). source is _loops.TASK_SOURCE:
 * asyncio's {loop: running task} table, read directly (the dict current_task() reads, up to
 * 3.13), or a callable(loop) -> task. */
static PyObject *
running_task_of(PyObject *source, PyObject *loop)
{
    if (!PyDict_CheckExact(source)) {
        return PyObject_CallOneArg(source, loop);
    }
    PyObject *task = PyDict_GetItemWithError(source, loop); /* borrowed */
    if (task == NULL && PyErr_Occurred()) {
        return NULL;
    }
    return Py_NewRef(task != NULL ? task : Py_None);
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
    task = running_task_of(self->current_task, self->loop);
    if (task == NULL) {
        goto done;
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

#ifdef ASYNCDIAG_RUNNING_LOOP
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

/* ---- Reading __slots__ attributes -------------------------------------------------------
 *
 * The hot paths read a few attributes of asyncdiag's own objects (Site, Runtime, Series, all
 * with __slots__) on every operation. PyObject_GetAttr costs about 200 instructions apiece on
 * 3.13 (80 on 3.11); read_slot remembers, per attribute, the slot's offset in the last type it
 * was read from, and reads it there directly while that type is unchanged (same version tag,
 * generic attribute lookup, a plain T_OBJECT_EX member: exactly what getattr would return).
 * Anything else, or an unset slot, goes to PyObject_GetAttr. */
typedef struct {
    PyObject **name;
    PyTypeObject *type; /* strong; NULL until a lookup found a slot */
    unsigned int version;
    Py_ssize_t offset;
} SlotCache;

static unsigned int
version_of(PyTypeObject *type)
{
#if PY_VERSION_HEX < 0x030C0000
    if (!PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) {
        return 0;
    }
#endif
    return type->tp_version_tag;
}

static PyObject *
read_slot(PyObject *obj, SlotCache *cache)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == cache->type && cache->version != 0 && version_of(type) == cache->version) {
        PyObject *value = *(PyObject **)((char *)obj + cache->offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    else if (type->tp_getattro == PyObject_GenericGetAttr) {
        PyObject *descr = _PyType_Lookup(type, *cache->name); /* borrowed; sets the tag */
        if (descr != NULL && Py_TYPE(descr) == &PyMemberDescr_Type
                && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX
                && version_of(type) != 0) {
            Py_XSETREF(cache->type, (PyTypeObject *)Py_NewRef((PyObject *)type));
            cache->version = version_of(type);
            cache->offset = ((PyMemberDescrObject *)descr)->d_member->offset;
        }
    }
    return PyObject_GetAttr(obj, *cache->name);
}

static PyObject *str_runtime, *str_fast, *str_enter, *str_exit_ok, *str_with_span, *str_subject,
    *str_slow_teardown, *str_tracing, *str_blocks;
#define SLOT(attribute) static SlotCache slot_##attribute = {&str_##attribute, NULL, 0, 0};
SLOT(limit) SLOT(runtime) SLOT(fast) SLOT(enter) SLOT(exit_ok) SLOT(with_span) SLOT(subject)
SLOT(slow_teardown) SLOT(tracing) SLOT(blocks)
#undef SLOT

/* perf_counter() in seconds. */
static int
perf_now(double *seconds)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t now;
    if (PyTime_PerfCounter(&now) < 0) {
        return -1;
    }
    *seconds = PyTime_AsSecondsDouble(now);
#else
    *seconds = _PyTime_AsSecondsDouble(_PyTime_GetPerfCounter());
#endif
    return 0;
}

/* record_since's work, for a series known to be a list (new reference: the duration). */
static PyObject *
record_duration(PyObject *series, double t0)
{
    double now;
    if (perf_now(&now) < 0) {
        return NULL;
    }
    PyObject *duration = PyFloat_FromDouble(now - t0);
    if (duration == NULL || PyList_Append(series, duration) < 0) {
        Py_XDECREF(duration);
        return NULL;
    }
    PyObject *limit = read_slot(series, &slot_limit);
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

/* fold_into(point, values, bounds): _telemetry._fold_into_python's work, without sorting.
 *
 * point is a histogram point, [count per bucket (len(bounds) + 1), sum, min, max, ...];
 * buckets are upper-inclusive (value v goes to the first bucket whose bound is >= v, past the
 * last bound to the last bucket). The Python version sorts the values and bisects once per
 * bound, about 900 instructions per value on 3.11 amortized; this does one binary search per
 * value over the bounds as doubles, and adds each bucket's count to the point once. The sum
 * is added in the values' order (the Python version sums them sorted). */
#define MAX_BOUNDS 64

static PyObject *
fold_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[1])
            || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "fold_into(point: list, values: list, bounds: tuple)");
        return NULL;
    }
    PyObject *point = args[0], *values = args[1], *bounds = args[2];
    Py_ssize_t nbounds = PyTuple_GET_SIZE(bounds);
    if (nbounds > MAX_BOUNDS || PyList_GET_SIZE(point) < nbounds + 4) {
        PyErr_SetString(PyExc_ValueError, "fold_into: a point of len(bounds) + 4 entries, "
                        "at most 64 bounds");
        return NULL;
    }
    double bound[MAX_BOUNDS];
    Py_ssize_t counts[MAX_BOUNDS + 1] = {0};
    for (Py_ssize_t i = 0; i < nbounds; i++) {
        bound[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (bound[i] == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_ssize_t n = PyList_GET_SIZE(values);
    if (n == 0) {
        Py_RETURN_NONE;
    }
    double total = 0.0, low = INFINITY, high = -INFINITY;
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = PyFloat_AsDouble(PyList_GET_ITEM(values, i));
        if (v == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        Py_ssize_t lo = 0, hi = nbounds; /* the first bound >= v */
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (bound[mid] < v) {
                lo = mid + 1;
            }
            else {
                hi = mid;
            }
        }
        counts[lo]++;
        total += v;
        low = v < low ? v : low;
        high = v > high ? v : high;
    }
    for (Py_ssize_t i = 0; i <= nbounds; i++) {
        if (counts[i] == 0) {
            continue;
        }
        PyObject *add = PyLong_FromSsize_t(counts[i]);
        PyObject *sum = add == NULL ? NULL : PyNumber_Add(PyList_GET_ITEM(point, i), add);
        Py_XDECREF(add);
        if (sum == NULL || PyList_SetItem(point, i, sum) < 0) {
            return NULL;
        }
    }
    PyObject *add = PyFloat_FromDouble(total);
    PyObject *sum = add == NULL ? NULL
        : PyNumber_Add(PyList_GET_ITEM(point, nbounds + 1), add);
    Py_XDECREF(add);
    if (sum == NULL || PyList_SetItem(point, nbounds + 1, sum) < 0) {
        return NULL;
    }
    double seen[2] = {low, high};
    for (int k = 0; k < 2; k++) {
        Py_ssize_t at = nbounds + 2 + k;
        double current = PyFloat_AsDouble(PyList_GET_ITEM(point, at));
        if (current == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        if (k == 0 ? seen[k] < current : seen[k] > current) {
            PyObject *value = PyFloat_FromDouble(seen[k]);
            if (value == NULL || PyList_SetItem(point, at, value) < 0) {
                return NULL;
            }
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
record_since(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "record_since(series: list, t0: float)");
        return NULL;
    }
    double t0 = PyFloat_AsDouble(args[1]);
    if (t0 == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    return record_duration(args[0], t0);
}


/* ---- Traced blocks --------------------------------------------------------------------------
 *
 * The common case of a traced `async with` (a task is running), in C: the bookkeeping around
 * the SDK's own calls is most of what a traced block adds over the SDK's span, and as Python
 * bytecode it cost about as much again as the span's own Python code. The Python versions in
 * _proxies (_open_span, _Open, _pop_open, _end_with_span) are the reference, the fallback, and
 * what every other case uses; they read and write Block records as they do _Open ones (the
 * same attributes).
 *
 *   open(name, obj) -> Block, None (not sampled), or NotImplemented (no running task: the
 *                      Python path)
 *       task = current task; if rt.pending_detach: unwind(rt, task)
 *       current = current_context()
 *       span = start_span(name, context=current)   (the tracer's, or Runtime.start_span)
 *       if span is None: return None
 *       ctx = set_span_in_context(span, current); token = attach(ctx)
 *   pop(obj, task) -> Block or None            (_pop_open)
 *   close(record, subject, outcome, exit_duration, task)   (_end_with_span, no error)
 *       the four attributes written as _spans.set_attributes does; span.end(); the span's
 *       parent made current again here when this task attached it and it is on top, else
 *       detach_later(rt, record, task) (_proxies._detach)
 */
/* The object fields of the types below, listed once: X(name) for each. */
#define BLOCK_FIELDS(X) X(ctx) X(obj) X(prev) X(probe) X(span) X(task) X(token)
#define BLOCKOPS_FIELDS(X) X(rt) X(running_loop) X(task_of) X(current_context) X(attach) \
    X(detach) X(start_span) X(set_span_in_context) X(set_attributes) X(direct_types) \
    X(opened) X(pending) X(unwind) X(pop_other) X(detach_later) X(keys) X(context_kwnames)
#define DECLARE_FIELD(name) PyObject *name;
#define VISIT_FIELD(name) Py_VISIT(self->name);
#define CLEAR_FIELD(name) Py_CLEAR(self->name);

/* tp_traverse, tp_clear and tp_dealloc of a GC type whose object fields are FIELDS. */
#define GC_FUNCTIONS(prefix, Type, FIELDS)                                  \
    static int prefix##_traverse(Type *self, visitproc visit, void *arg)   \
    {                                                                       \
        FIELDS(VISIT_FIELD)                                                 \
        return 0;                                                           \
    }                                                                       \
    static int prefix##_clear(Type *self)                                   \
    {                                                                       \
        FIELDS(CLEAR_FIELD)                                                 \
        return 0;                                                           \
    }                                                                       \
    static void prefix##_dealloc(Type *self)                                \
    {                                                                       \
        PyObject_GC_UnTrack(self);                                          \
        prefix##_clear(self);                                               \
        Py_TYPE(self)->tp_free((PyObject *)self);                           \
    }

typedef struct {
    PyObject_HEAD
    BLOCK_FIELDS(DECLARE_FIELD)
    double enter_duration;
} Block;

GC_FUNCTIONS(block, Block, BLOCK_FIELDS)

static PyMemberDef block_members[] = {
    {"ctx", T_OBJECT, offsetof(Block, ctx), 0, NULL},
    {"obj", T_OBJECT, offsetof(Block, obj), 0, NULL},
    {"prev", T_OBJECT, offsetof(Block, prev), 0, NULL},
    {"probe", T_OBJECT, offsetof(Block, probe), 0, NULL},
    {"span", T_OBJECT, offsetof(Block, span), 0, NULL},
    {"task", T_OBJECT, offsetof(Block, task), 0, NULL},
    {"token", T_OBJECT, offsetof(Block, token), 0, NULL},
    {"enter_duration", T_DOUBLE, offsetof(Block, enter_duration), 0, NULL},
    {NULL},
};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncdiag._speedups.Block",
    .tp_doc = "An entered traced block (see _proxies._Open, its Python equivalent).",
    .tp_basicsize = sizeof(Block),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)block_traverse,
    .tp_clear = (inquiry)block_clear,
    .tp_dealloc = (destructor)block_dealloc,
    .tp_members = block_members,
};

/* What the common case of a traced block needs, fixed for one Runtime:
 *   rt                  the _proxies.Runtime
 *   running_loop        () -> loop or None
 *   task_of             _loops.TASK_SOURCE (see running_task_of)
 *   current_context, attach, detach   OpenTelemetry's current Context (_spans.context_access)
 *   start_span          the tracer's bound start_span, or Runtime.start_span
 *   set_span_in_context (span, context) -> Context
 *   set_attributes      _spans.set_attributes(span, attributes)
 *   direct_types        _spans.DIRECT_TYPES: span type -> writable directly
 *   opened, pending     rt.open ((id(obj), task) -> record) and rt.pending_detach
 *   unwind, pop_other, detach_later   _proxies._unwind, _pop_open, _detach
 *   keys                the four attribute names (subject, outcome, enter and exit duration)
 *   context_kwnames     ("context",) */
typedef struct {
    PyObject_HEAD
    BLOCKOPS_FIELDS(DECLARE_FIELD)
} BlockOps;

GC_FUNCTIONS(blockops, BlockOps, BLOCKOPS_FIELDS)

static PyObject *str_end, *str_attributes_attr, *str_dict_attr, *str_maxlen, *str_max_value_len,
    *str_end_time;

/* The running task (new reference; None outside a loop or a task): running_loop() is
 * _loops.running_loop, source _loops.TASK_SOURCE (see running_task_of). */
static PyObject *
current_task(PyObject *running_loop, PyObject *source)
{
    PyObject *loop = PyObject_CallNoArgs(running_loop);
    if (loop == NULL) {
        return NULL;
    }
    if (loop == Py_None) {
        return loop;
    }
    PyObject *task = running_task_of(source, loop);
    Py_DECREF(loop);
    return task;
}

static PyObject *
blockops_open(BlockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "open(name, obj)");
        return NULL;
    }
    PyObject *task = current_task(self->running_loop, self->task_of);
    if (task == NULL) {
        return NULL;
    }
    if (task == Py_None) {
        Py_DECREF(task);
        Py_RETURN_NOTIMPLEMENTED; /* a coroutine driven by hand: the Python path's probe */
    }
    PyObject *current = NULL, *span = NULL, *ctx = NULL, *token = NULL;
    if (PyDict_GET_SIZE(self->pending)) {
        PyObject *done = PyObject_CallFunctionObjArgs(self->unwind, self->rt, task, NULL);
        if (done == NULL) {
            goto error;
        }
        Py_DECREF(done);
    }
    current = PyObject_CallNoArgs(self->current_context);
    if (current == NULL) {
        goto error;
    }
    PyObject *call_args[2] = {args[0], current};
    span = PyObject_Vectorcall(self->start_span, call_args, 1, self->context_kwnames);
    if (span == NULL) {
        goto error;
    }
    if (span == Py_None) { /* the pre-check found the span would not be sampled */
        Py_DECREF(task);
        Py_DECREF(current);
        return span;
    }
    ctx = PyObject_CallFunctionObjArgs(self->set_span_in_context, span, current, NULL);
    if (ctx == NULL) {
        goto error;
    }
    token = PyObject_CallOneArg(self->attach, ctx);
    if (token == NULL) {
        goto error;
    }
    Block *record = PyObject_GC_New(Block, &BlockType);
    if (record == NULL) {
        goto error;
    }
    record->ctx = ctx;
    record->obj = Py_NewRef(args[1]);
    record->prev = NULL;
    record->probe = NULL;
    record->span = span;
    record->task = task;
    record->token = token;
    record->enter_duration = 0.0;
    Py_DECREF(current);
    PyObject_GC_Track(record);
    return (PyObject *)record;

error:
    Py_DECREF(task);
    Py_XDECREF(current);
    Py_XDECREF(span);
    Py_XDECREF(ctx);
    Py_XDECREF(token);
    return NULL;
}

static PyObject *
blockops_pop(BlockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pop(obj, task)");
        return NULL;
    }
    PyObject *obj = args[0], *task = args[1];
    PyObject *id = PyLong_FromVoidPtr(obj);
    if (id == NULL) {
        return NULL;
    }
    PyObject *key = PyTuple_Pack(2, id, task);
    Py_DECREF(id);
    if (key == NULL) {
        return NULL;
    }
    PyObject *record = PyDict_GetItemWithError(self->opened, key); /* borrowed */
    if (record == NULL || Py_TYPE(record) != &BlockType || ((Block *)record)->obj != obj
            || (((Block *)record)->prev != NULL && ((Block *)record)->prev != Py_None)) {
        Py_DECREF(key);
        if (PyErr_Occurred()) {
            return NULL;
        }
        /* Not found under this task, re-entered, or not ours: the Python path decides. */
        return PyObject_CallFunctionObjArgs(self->pop_other, self->rt, obj, task, NULL);
    }
    Py_INCREF(record);
    int deleted = PyDict_DelItem(self->opened, key);
    Py_DECREF(key);
    if (deleted < 0) {
        Py_DECREF(record);
        return NULL;
    }
    return record;
}

/* _spans.set_attributes for the four attributes of a closing block. */
static int
write_attributes(BlockOps *self, PyObject *span, PyObject *values[4])
{
    PyObject *direct = PyDict_GetItemWithError(self->direct_types, (PyObject *)Py_TYPE(span));
    if (direct == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (direct == Py_True) {
        PyObject *end_time = PyObject_GetAttr(span, str_end_time);
        PyObject *store = end_time == NULL ? NULL : PyObject_GetAttr(span, str_attributes_attr);
        PyObject *dict = store == NULL ? NULL : PyObject_GetAttr(store, str_dict_attr);
        PyObject *limit = dict == NULL ? NULL : PyObject_GetAttr(store, str_maxlen);
        PyObject *value_limit = limit == NULL ? NULL : PyObject_GetAttr(store, str_max_value_len);
        int ok = -1;
        if (value_limit != NULL) {
            ok = 0;
            if (end_time == Py_None && value_limit == Py_None && PyDict_CheckExact(dict)) {
                if (limit == Py_None) {
                    ok = 1;
                }
                else {
                    Py_ssize_t at = PyLong_AsSsize_t(limit);
                    if (at == -1 && PyErr_Occurred()) {
                        ok = -1;
                    }
                    else {
                        ok = PyDict_GET_SIZE(dict) + 4 <= at;
                    }
                }
            }
            for (int i = 0; ok == 1 && i < 4; i++) {
                if (PyDict_SetItem(dict, PyTuple_GET_ITEM(self->keys, i), values[i]) < 0) {
                    ok = -1;
                }
            }
        }
        Py_XDECREF(end_time);
        Py_XDECREF(store);
        Py_XDECREF(dict);
        Py_XDECREF(limit);
        Py_XDECREF(value_limit);
        if (ok != 0) {
            return ok < 0 ? -1 : 0;
        }
    }
    /* Not known yet, not writable directly, or limits in play: the Python function. */
    PyObject *attributes = PyDict_New();
    if (attributes == NULL) {
        return -1;
    }
    for (int i = 0; i < 4; i++) {
        if (PyDict_SetItem(attributes, PyTuple_GET_ITEM(self->keys, i), values[i]) < 0) {
            Py_DECREF(attributes);
            return -1;
        }
    }
    PyObject *done = PyObject_CallFunctionObjArgs(self->set_attributes, span, attributes, NULL);
    Py_DECREF(attributes);
    if (done == NULL) {
        return -1;
    }
    Py_DECREF(done);
    return 0;
}

static PyObject *
blockops_close(BlockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || Py_TYPE(args[0]) != &BlockType) {
        PyErr_SetString(PyExc_TypeError,
                        "close(record: Block, subject, outcome, exit_duration, task)");
        return NULL;
    }
    Block *record = (Block *)args[0];
    PyObject *task = args[4];
    PyObject *span = record->span;
    if (span == NULL) {
        PyErr_SetString(PyExc_ValueError, "a block without a span");
        return NULL;
    }
    Py_INCREF(span);
    PyObject *enter = PyFloat_FromDouble(record->enter_duration);
    if (enter == NULL) {
        Py_DECREF(span);
        return NULL;
    }
    PyObject *values[4] = {args[1], args[2], enter, args[3]};
    int written = write_attributes(self, span, values);
    Py_DECREF(enter);
    PyObject *ended = written < 0 ? NULL : PyObject_CallMethodNoArgs(span, str_end);
    Py_DECREF(span);
    if (ended == NULL) {
        return NULL;
    }
    Py_DECREF(ended);
    if (record->task == task && task != Py_None && PyDict_GET_SIZE(self->pending) == 0) {
        PyObject *current = PyObject_CallNoArgs(self->current_context);
        if (current == NULL) {
            return NULL;
        }
        Py_DECREF(current); /* only its identity is compared */
        if (current == record->ctx && record->token != NULL) {
            PyObject *done = PyObject_CallOneArg(self->detach, record->token);
            if (done == NULL) {
                return NULL;
            }
            Py_DECREF(done);
            Py_RETURN_NONE;
        }
    }
    return PyObject_CallFunctionObjArgs(self->detach_later, self->rt, (PyObject *)record, task,
                                        NULL);
}

static PyObject *
blockops_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"rt", "running_loop", "task_of", "current_context", "attach",
                             "detach", "start_span", "set_span_in_context", "set_attributes",
                             "direct_types", "opened", "pending", "unwind", "pop_other",
                             "detach_later", "keys", NULL};
    PyObject *v[16];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOO!O!O!OOOO!:BlockOps", kwlist,
                                     &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7],
                                     &v[8], &PyDict_Type, &v[9], &PyDict_Type, &v[10],
                                     &PyDict_Type, &v[11], &v[12], &v[13], &v[14],
                                     &PyTuple_Type, &v[15])) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(v[15]) != 4) {
        PyErr_SetString(PyExc_ValueError, "keys: the four attribute names");
        return NULL;
    }
    BlockOps *self = (BlockOps *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->context_kwnames = Py_BuildValue("(s)", "context");
    if (self->context_kwnames == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    PyObject **fields[16] = {&self->rt, &self->running_loop, &self->task_of,
                             &self->current_context, &self->attach, &self->detach,
                             &self->start_span, &self->set_span_in_context,
                             &self->set_attributes, &self->direct_types, &self->opened,
                             &self->pending, &self->unwind, &self->pop_other,
                             &self->detach_later, &self->keys};
    for (int i = 0; i < 16; i++) {
        *fields[i] = Py_NewRef(v[i]);
    }
    return (PyObject *)self;
}

static PyMethodDef blockops_methods[] = {
    {"open", (PyCFunction)(void (*)(void))blockops_open, METH_FASTCALL,
     "open(name, obj) -> Block, or NotImplemented without a running task"},
    {"pop", (PyCFunction)(void (*)(void))blockops_pop, METH_FASTCALL,
     "pop(obj, task) -> the open record of obj, or None"},
    {"close", (PyCFunction)(void (*)(void))blockops_close, METH_FASTCALL,
     "close(record, subject, outcome, exit_duration, task): end the span, restore the context"},
    {NULL},
};

static PyTypeObject BlockOpsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncdiag._speedups.BlockOps",
    .tp_doc = "The common case of a traced async with (see _proxies._open_span, _pop_open and "
              "_end_with_span, its Python equivalents).",
    .tp_basicsize = sizeof(BlockOps),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = blockops_new,
    .tp_traverse = (traverseproc)blockops_traverse,
    .tp_clear = (inquiry)blockops_clear,
    .tp_dealloc = (destructor)blockops_dealloc,
    .tp_methods = blockops_methods,
};


/* ---- Counted generator requests --------------------------------------------------------------
 *
 * CountedBase: the per-item part of _proxies._Counted, what `async for` drives over an
 * instrumented async generator when only metrics are recorded. As a Python method this was
 * one call per item, about as much as the item itself on 3.13; as the type's am_anext slot
 * the interpreter calls it without a frame. The reference is _proxies._CountedRequests:
 *
 *     def __anext__(self):
 *         left = self.left - 1
 *         self.left = left
 *         if left:
 *             return anext(self.agen)
 *         return self._timed(anext(self.agen))
 *
 * and asend(value) likewise with self.agen.asend(value). */
#define COUNTED_FIELDS(X) X(agen)

typedef struct {
    PyObject_HEAD
    COUNTED_FIELDS(DECLARE_FIELD)
    Py_ssize_t left; /* counts down to the next timed request; negative: not measuring */
} CountedBase;

GC_FUNCTIONS(counted, CountedBase, COUNTED_FIELDS)

static PyObject *str_timed, *str_asend;

static PyObject *
counted_anext(CountedBase *self)
{
    PyObject *agen = self->agen;
    if (agen == NULL) {
        PyErr_SetString(PyExc_ValueError, "no generator to count");
        return NULL;
    }
    PyAsyncMethods *async = Py_TYPE(agen)->tp_as_async;
    if (async == NULL || async->am_anext == NULL) {
        PyErr_Format(PyExc_TypeError, "'%.200s' object is not an async iterator",
                     Py_TYPE(agen)->tp_name);
        return NULL;
    }
    Py_ssize_t left = --self->left;
    PyObject *awaitable = async->am_anext(agen);
    if (left || awaitable == NULL) {
        return awaitable;
    }
    PyObject *timed = PyObject_CallMethodOneArg((PyObject *)self, str_timed, awaitable);
    Py_DECREF(awaitable);
    return timed;
}

static PyObject *
counted_asend(CountedBase *self, PyObject *value)
{
    if (self->agen == NULL) {
        PyErr_SetString(PyExc_ValueError, "no generator to count");
        return NULL;
    }
    Py_ssize_t left = --self->left;
    PyObject *awaitable = PyObject_CallMethodOneArg(self->agen, str_asend, value);
    if (left || awaitable == NULL) {
        return awaitable;
    }
    PyObject *timed = PyObject_CallMethodOneArg((PyObject *)self, str_timed, awaitable);
    Py_DECREF(awaitable);
    return timed;
}

/* __aiter__, __await__, __iter__ of an object that is its own iterator. */
static PyObject *
return_self(PyObject *self)
{
    return Py_NewRef(self);
}

static PyAsyncMethods counted_async = {
    .am_aiter = return_self,
    .am_anext = (unaryfunc)counted_anext,
};

static PyMethodDef counted_methods[] = {
    {"asend", (PyCFunction)counted_asend, METH_O,
     "asend(value): the generator's own asend awaitable, counted"},
    {NULL},
};

static PyMemberDef counted_members[] = {
    {"agen", T_OBJECT, offsetof(CountedBase, agen), 0, NULL},
    {"left", T_PYSSIZET, offsetof(CountedBase, left), 0, NULL},
    {NULL},
};

static PyTypeObject CountedBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncdiag._speedups.CountedBase",
    .tp_doc = "The per-item part of _proxies._Counted (see _CountedRequests, its Python "
              "equivalent).",
    .tp_basicsize = sizeof(CountedBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)counted_traverse,
    .tp_clear = (inquiry)counted_clear,
    .tp_dealloc = (destructor)counted_dealloc,
    .tp_as_async = &counted_async,
    .tp_methods = counted_methods,
    .tp_members = counted_members,
};

/* ---- Measured __aenter__ / __aexit__ ---------------------------------------------------------
 *
 * MeasuredDunder: an instrumented class's __aenter__ or __aexit__ (and AsyncCMProxy's) when
 * the extension is built. It stands for the Python wrapper that _proxies.make_cm_methods made
 * (`reference`), which stays the reference and the path of every case not handled here: every
 * attribute, the class isinstance and inspect see, and the repr are the reference function's,
 * so inspect.iscoroutinefunction, signature and asyncdiag's own marks answer as before.
 *
 * Called, it handles the two common cases of the reference itself, when the block is measured
 * on the patched class's own type (not a subclass) with the protocol's arguments:
 *   metrics only   site.fast is RUNTIME
 *   traced         site.runtime is RUNTIME, rt.tracing, rt.blocks a BlockOps
 * by calling the original at once and returning a MeasuredAwait around what it returned: no
 * wrapper coroutine, whose frame and bytecode were most of what a measured block cost. RUNTIME
 * None, or disabled: the original's awaitable itself. Any other case: the reference.
 *
 * MeasuredAwait does, step for step, what the reference does around `await call(...)`:
 *   first step  (exit) the running task and its cancellation count; (traced) blocks.open or
 *               blocks.pop; then t0
 *   returned    the duration recorded, the findings and the span's end through the same
 *               helpers (_ok_exit_findings, _exited, BlockOps.close, _push_open ...)
 *   raised      _enter_failed / _exit_failed, and the same exception object goes on, with no
 *               frame of ours in its traceback
 * Internal errors go to _proxies.failed, as the reference's `except Exception` blocks do. To
 * asyncio and inspect it is the original's coroutine: send, throw, close, __await__, and that
 * coroutine's class and attributes (cr_frame, cr_code, __qualname__ ...).
 */

/* _proxies.RUNTIME, as _proxies.set_runtime last set it (strong; NULL for None): read on
 * every call, where a lookup in the module's globals cost a dict probe (350 instructions a
 * call on 3.13). */
static PyObject *current_runtime = NULL;

static PyObject *
set_runtime(PyObject *module, PyObject *runtime)
{
    Py_XSETREF(current_runtime, runtime == Py_None ? NULL : Py_NewRef(runtime));
    Py_RETURN_NONE;
}

/* The _proxies objects both types use, in one tuple, in this order. */
enum {
    H_FAILED,           /* failed(internal) */
    H_ENTER_FAILED,     /* _enter_failed(rt, site, record, exc, duration) */
    H_EXIT_FAILED,      /* _exit_failed(rt, site, record, exc, duration, task, frame) */
    H_OK_EXIT_FINDINGS, /* _ok_exit_findings(rt, site, record, duration, task, cancelling, frame) */
    H_EXITED,           /* _exited(rt, site, record, exc_type, suppress, duration, task,
                           cancelling, frame) */
    H_END_WITH_SPAN,    /* _end_with_span(rt, record, outcome, duration, exc_type, site, task) */
    H_OPEN_SPAN,        /* _open_span(rt, obj, site) */
    H_PUSH_OPEN,        /* _push_open(rt, record) */
    H_RUNNING_LOOP,     /* _loops.running_loop */
    H_TASK_SOURCE,      /* _loops.TASK_SOURCE (see running_task_of) */
    H_MAX_OPEN,         /* MAX_OPEN */
    H_COUNT
};

static PyObject *str_bind, *str_aenter, *str_aexit, *str_self_site,
    *str_cancelling, *str_task, *str_enter_duration, *str_ok, *str_throw, *str_close,
    *str_value, *str_gi_code, *str_reference, *str_active;

#define DUNDER_FIELDS(X) X(reference) X(call) X(site) X(owner) X(helpers) X(pair)

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    DUNDER_FIELDS(DECLARE_FIELD)
    char is_exit;      /* __aexit__ (else __aenter__) */
    char check_cancel; /* compare the task's cancellation count around the call (see the
                          reference's check_cancel) */
    char active;       /* cleared by the reference's disable() */
} MeasuredDunder;

/* pair: the list [__aenter__, __aexit__] as patched on owner (this one and its partner). */

GC_FUNCTIONS(dunder, MeasuredDunder, DUNDER_FIELDS)

#define AWAIT_FIELDS(X) X(dunder) X(inner) X(obj) X(site) X(rt) X(ops) X(exc_type) X(task) \
    X(record)

enum { AWAIT_NEW, AWAIT_MEASURING, AWAIT_PASSING, AWAIT_DONE };

typedef struct {
    PyObject_HEAD
    AWAIT_FIELDS(DECLARE_FIELD)
    PyObject *weakreflist;
    double t0;
    long cancelling; /* the task's count before the call; -1: not known, or not needed */
    char state;      /* AWAIT_*: PASSING only delegates (RUNTIME changed before the first step) */
    char running;    /* inside a step of inner: a re-entrant call only delegates */
    char suspended;  /* inner has yielded (to the loop) at least once */
    char traced;
} MeasuredAwait;

static PyTypeObject MeasuredAwaitType;

#define HELPER(dunder, index) PyTuple_GET_ITEM(((MeasuredDunder *)(dunder))->helpers, index)

/* The exception being raised, normalized and taken off the thread (new reference). */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raise exc again, unchanged (steals the reference). */
static void
give_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* An error of asyncdiag's own: `except Exception as internal: failed(internal)`. 0 if that
 * handled it; -1 with it still raised if it is not an Exception (KeyboardInterrupt...). */
static int
internal_error(PyObject *dunder)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *internal = take_exception();
    PyObject *done = PyObject_CallOneArg(HELPER(dunder, H_FAILED), internal);
    if (done == NULL) {
        PyErr_WriteUnraisable(HELPER(dunder, H_FAILED));
    }
    Py_XDECREF(done);
    Py_XDECREF(internal);
    return 0;
}

/* What `await o` iterates (as the interpreter's GET_AWAITABLE finds it; new reference). */
static PyObject *
await_iter(PyObject *o)
{
    if (PyCoro_CheckExact(o)) {
        return Py_NewRef(o);
    }
    if (PyGen_CheckExact(o)) { /* a generator-based coroutine (types.coroutine) */
        PyObject *code = PyObject_GetAttr(o, str_gi_code);
        if (code == NULL) {
            return NULL;
        }
        int iterable = PyCode_Check(code)
            && (((PyCodeObject *)code)->co_flags & CO_ITERABLE_COROUTINE);
        Py_DECREF(code);
        if (iterable) {
            return Py_NewRef(o);
        }
    }
    PyAsyncMethods *async = Py_TYPE(o)->tp_as_async;
    if (async == NULL || async->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    PyObject *it = async->am_await(o);
    if (it != NULL && PyCoro_CheckExact(it)) {
        PyErr_SetString(PyExc_TypeError, "__await__() returned a coroutine");
        Py_CLEAR(it);
    }
    else if (it != NULL && !PyIter_Check(it)) {
        PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                     Py_TYPE(it)->tp_name);
        Py_CLEAR(it);
    }
    return it;
}

/* The frame that awaits us (the `async with` line's), or None; borrowed. */
static PyObject *
awaiting_frame(void)
{
    PyObject *frame = (PyObject *)PyEval_GetFrame();
    return frame != NULL ? frame : Py_None;
}

#define OR_NONE(o) ((o) != NULL ? (o) : Py_None)

/* The failure helper for exc (not raised). 0, or -1 with an exception of ours raised that
 * must go out instead (a BaseException that is not an Exception). */
static int
failed_call(MeasuredAwait *w, PyObject *exc, double duration)
{
    MeasuredDunder *dunder = (MeasuredDunder *)w->dunder;
    PyObject *seconds = PyFloat_FromDouble(duration);
    if (seconds == NULL) {
        return internal_error(w->dunder);
    }
    PyObject *done;
    if (dunder->is_exit) {
        PyObject *args[7] = {w->rt, w->site, OR_NONE(w->record), exc, seconds,
                             OR_NONE(w->task), awaiting_frame()};
        done = PyObject_Vectorcall(HELPER(dunder, H_EXIT_FAILED), args, 7, NULL);
    }
    else {
        PyObject *args[5] = {w->rt, w->site, OR_NONE(w->record), exc, seconds};
        done = PyObject_Vectorcall(HELPER(dunder, H_ENTER_FAILED), args, 5, NULL);
    }
    Py_DECREF(seconds);
    if (done == NULL) {
        return internal_error(w->dunder);
    }
    Py_DECREF(done);
    return 0;
}

/* The traced __aenter__'s record into rt.open (the reference's inline _push_open). */
static int
push_record(MeasuredAwait *w, PyObject *duration)
{
    PyObject *record = w->record;
    PyObject *task;
    if (Py_TYPE(record) == &BlockType) {
        ((Block *)record)->enter_duration = PyFloat_AS_DOUBLE(duration);
        task = Py_NewRef(OR_NONE(((Block *)record)->task));
    }
    else {
        if (PyObject_SetAttr(record, str_enter_duration, duration) < 0) {
            return -1;
        }
        task = PyObject_GetAttr(record, str_task);
        if (task == NULL) {
            return -1;
        }
    }
    PyObject *opened = ((BlockOps *)w->ops)->opened;
    PyObject *id = PyLong_FromVoidPtr(w->obj);
    PyObject *key = id == NULL ? NULL : PyTuple_Pack(2, id, task);
    Py_XDECREF(id);
    Py_DECREF(task);
    if (key == NULL) {
        return -1;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(HELPER(w->dunder, H_MAX_OPEN));
    int present = PyDict_Contains(opened, key);
    int done;
    if (present < 0 || (limit == -1 && PyErr_Occurred())) {
        done = -1;
    }
    else if (PyDict_GET_SIZE(opened) < limit && !present) {
        done = PyDict_SetItem(opened, key, record);
    }
    else {
        PyObject *pushed = PyObject_CallFunctionObjArgs(HELPER(w->dunder, H_PUSH_OPEN), w->rt,
                                                        record, NULL);
        Py_XDECREF(pushed);
        done = pushed == NULL ? -1 : 0;
    }
    Py_DECREF(key);
    return done;
}

/* task.cancelling() into *count: 0, or -1 with the error raised. */
static int
cancel_count(PyObject *task, long *count)
{
    PyObject *now = PyObject_CallMethodNoArgs(task, str_cancelling);
    if (now == NULL) {
        return -1;
    }
    *count = PyLong_AsLong(now);
    Py_DECREF(now);
    return *count == -1 && PyErr_Occurred() ? -1 : 0;
}

/* Whether the task's cancellation count went up during the call (1), not (0), or error. */
static int
cancelled_inside(MeasuredAwait *w)
{
    long count;
    if (w->cancelling < 0) {
        return 0;
    }
    return cancel_count(w->task, &count) < 0 ? -1 : count > w->cancelling;
}

/* The original returned result. 0, or -1 with an exception of ours that goes out instead. */
static int
finish_ok(MeasuredAwait *w, PyObject *result)
{
    MeasuredDunder *dunder = (MeasuredDunder *)w->dunder;
    PyObject *series = NULL, *duration = NULL, *done = NULL;
    if (!dunder->is_exit || w->exc_type == Py_None) {
        series = read_slot(w->site, dunder->is_exit ? &slot_exit_ok : &slot_enter);
        if (series == NULL) {
            goto error;
        }
        if (!PyList_Check(series)) {
            PyErr_SetString(PyExc_TypeError, "a site's series must be a list");
            goto error;
        }
        duration = record_duration(series, w->t0);
        if (duration == NULL) {
            goto error;
        }
    }
    if (!dunder->is_exit) {
        if (w->record != NULL && w->record != Py_None && push_record(w, duration) < 0) {
            goto error;
        }
    }
    else if (w->exc_type == Py_None) {
        PyObject *limit = read_slot(w->rt, &slot_slow_teardown);
        int slow = limit == NULL ? -1
            : PyObject_RichCompareBool(duration, limit, Py_GT);
        Py_XDECREF(limit);
        int found = slow != 0 ? slow : cancelled_inside(w);
        if (found < 0) {
            goto error;
        }
        if (found) {
            PyObject *cancelling = PyLong_FromLong(w->cancelling);
            if (cancelling == NULL) {
                goto error;
            }
            PyObject *args[7] = {w->rt, w->site, OR_NONE(w->record), duration,
                                 OR_NONE(w->task), cancelling, awaiting_frame()};
            done = PyObject_Vectorcall(HELPER(dunder, H_OK_EXIT_FINDINGS), args, 7, NULL);
            Py_DECREF(cancelling);
            if (done == NULL) {
                goto error;
            }
            Py_CLEAR(done);
        }
        if (w->record != NULL && w->record != Py_None) {
            PyObject *subject = read_slot(w->site, &slot_subject);
            if (subject == NULL) {
                goto error;
            }
            if (Py_TYPE(w->record) == &BlockType) {
                PyObject *args[5] = {w->record, subject, str_ok, duration, OR_NONE(w->task)};
                done = blockops_close((BlockOps *)w->ops, args, 5);
            }
            else {
                PyObject *args[7] = {w->rt, w->record, str_ok, duration, Py_None, w->site,
                                     OR_NONE(w->task)};
                done = PyObject_Vectorcall(HELPER(dunder, H_END_WITH_SPAN), args, 7, NULL);
            }
            Py_DECREF(subject);
            if (done == NULL) {
                goto error;
            }
            Py_CLEAR(done);
        }
    }
    else {
        double now;
        if (perf_now(&now) < 0) {
            goto error;
        }
        PyObject *seconds = PyFloat_FromDouble(now - w->t0);
        PyObject *cancelling = seconds == NULL ? NULL : PyLong_FromLong(w->cancelling);
        if (cancelling == NULL) {
            Py_XDECREF(seconds);
            goto error;
        }
        PyObject *args[9] = {w->rt, w->site, OR_NONE(w->record), w->exc_type, result, seconds,
                             OR_NONE(w->task), cancelling, awaiting_frame()};
        done = PyObject_Vectorcall(HELPER(dunder, H_EXITED), args, 9, NULL);
        Py_DECREF(seconds);
        Py_DECREF(cancelling);
        if (done == NULL) {
            goto error;
        }
        Py_CLEAR(done);
    }
    Py_XDECREF(series);
    Py_XDECREF(duration);
    return 0;

error:
    Py_XDECREF(series);
    Py_XDECREF(duration);
    return internal_error(w->dunder);
}

/* From now on only the original's awaitable, iterated as `await` does (state PASSING): 0, or
 * -1 with the error raised and the state unchanged. */
static int
pass_through(MeasuredAwait *w)
{
    PyObject *it = await_iter(w->inner);
    if (it == NULL) {
        return -1;
    }
    Py_SETREF(w->inner, it);
    w->state = AWAIT_PASSING;
    return 0;
}

/* The first step: what the reference does before its `await`. 0 (state MEASURING, or
 * PASSING), or -1 with the exception to raise (state DONE). */
static int
start(MeasuredAwait *w)
{
    MeasuredDunder *dunder = (MeasuredDunder *)w->dunder;
    if (current_runtime != w->rt) { /* uninstalled (or failed) since the call: the original */
        goto pass;
    }
    if (dunder->is_exit) {
        int traced_open = w->traced && PyDict_GET_SIZE(((BlockOps *)w->ops)->opened);
        if (dunder->check_cancel || traced_open) {
            w->task = current_task(HELPER(dunder, H_RUNNING_LOOP), HELPER(dunder, H_TASK_SOURCE));
            if (w->task == NULL) {
                goto internal;
            }
            if (dunder->check_cancel && w->task != Py_None
                    && cancel_count(w->task, &w->cancelling) < 0) {
                w->cancelling = -1;
                if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                    goto internal;
                }
                PyErr_Clear(); /* a Task-like object without cancelling() */
            }
            if (traced_open) {
                PyObject *args[2] = {w->obj, w->task};
                w->record = blockops_pop((BlockOps *)w->ops, args, 2);
                if (w->record == NULL) {
                    goto internal;
                }
            }
        }
    }
    else if (w->traced) {
        PyObject *name = read_slot(w->site, &slot_with_span);
        if (name != NULL) {
            PyObject *args[2] = {name, w->obj};
            w->record = blockops_open((BlockOps *)w->ops, args, 2);
            Py_DECREF(name);
        }
        if (w->record == NULL) {
            if (internal_error(w->dunder) < 0) {
                w->state = AWAIT_DONE;
                return -1;
            }
        }
        else if (w->record == Py_NotImplemented) { /* no running task: the Python path */
            Py_SETREF(w->record, PyObject_CallFunctionObjArgs(HELPER(dunder, H_OPEN_SPAN),
                                                              w->rt, w->obj, w->site, NULL));
            if (w->record == NULL && internal_error(w->dunder) < 0) {
                w->state = AWAIT_DONE;
                return -1;
            }
        }
    }
    if (perf_now(&w->t0) < 0) {
        goto internal;
    }
    w->state = AWAIT_MEASURING;
    PyObject *it = await_iter(w->inner);
    if (it == NULL) { /* as the reference's `await` would: a failure of the call */
        w->state = AWAIT_DONE;
        PyObject *exc = take_exception();
        double now;
        if (perf_now(&now) < 0 || failed_call(w, exc, now - w->t0) < 0) {
            Py_DECREF(exc);
            return -1;
        }
        give_exception(exc);
        return -1;
    }
    Py_SETREF(w->inner, it);
    return 0;

internal:
    if (internal_error(w->dunder) < 0) {
        w->state = AWAIT_DONE;
        return -1;
    }
pass:
    if (pass_through(w) < 0) {
        w->state = AWAIT_DONE;
        return -1;
    }
    return 0;
}

/* Drop what only the measurement needed, once it is over. */
static void
measurement_over(MeasuredAwait *w)
{
    w->state = AWAIT_DONE;
    Py_CLEAR(w->obj);
    Py_CLEAR(w->site);
    Py_CLEAR(w->rt);
    Py_CLEAR(w->ops);
    Py_CLEAR(w->exc_type);
    Py_CLEAR(w->task);
    Py_CLEAR(w->record);
}

/* After one step of inner, with what it gave (PyIter_Send's result and *result). */
static PySendResult
after_step(MeasuredAwait *w, PySendResult r, PyObject **result)
{
    w->running = 0;
    if (r == PYGEN_NEXT || w->state != AWAIT_MEASURING) {
        w->suspended |= r == PYGEN_NEXT;
        return r;
    }
    if (!w->suspended) {
        /* A cancellation is delivered only where a coroutine suspends: one that never did
         * cannot have caught one, whatever the count says now (a count raised by the code
         * itself is delivered at its next suspension, outside), so it is not read again. */
        w->cancelling = -1;
    }
    if (r == PYGEN_RETURN) {
        int ok = finish_ok(w, *result);
        measurement_over(w);
        if (ok < 0) {
            Py_CLEAR(*result);
            return PYGEN_ERROR;
        }
        return PYGEN_RETURN;
    }
    PyObject *exc = take_exception();
    if (exc == NULL) {
        measurement_over(w);
        PyErr_SetString(PyExc_SystemError, "an awaitable failed without an exception");
        return PYGEN_ERROR;
    }
    double now;
    int reported = perf_now(&now) < 0 ? internal_error(w->dunder)
        : failed_call(w, exc, now - w->t0);
    measurement_over(w);
    if (reported < 0) { /* ours goes out, with the original's exception as its context */
        PyObject *ours = take_exception();
        PyException_SetContext(ours, exc);
        give_exception(ours);
        return PYGEN_ERROR;
    }
    give_exception(exc);
    return PYGEN_ERROR;
}

static PySendResult
await_send(MeasuredAwait *w, PyObject *value, PyObject **result)
{
    *result = NULL;
    if (w->state == AWAIT_NEW && !w->running && start(w) < 0) {
        return PYGEN_ERROR;
    }
    if (w->running || w->state != AWAIT_MEASURING) {
        return PyIter_Send(w->inner, value, result);
    }
    w->running = 1;
    PySendResult r = PyIter_Send(w->inner, value, result);
    return after_step(w, r, result);
}

/* StopIteration(value), however value looks (a tuple, an exception). */
static void
set_stop_iteration(PyObject *value)
{
    if (value == Py_None) {
        PyErr_SetNone(PyExc_StopIteration);
        return;
    }
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
}

/* A send result as a method returns it. */
static PyObject *
sent(PySendResult r, PyObject *result)
{
    if (r == PYGEN_NEXT) {
        return result;
    }
    if (r == PYGEN_RETURN) {
        set_stop_iteration(result);
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *
await_iternext(MeasuredAwait *w)
{
    PyObject *result;
    PySendResult r = await_send(w, Py_None, &result);
    if (r == PYGEN_RETURN && result == Py_None) {
        Py_DECREF(result);
        return NULL; /* exhausted: StopIteration(None), without making one */
    }
    return sent(r, result);
}

static PyObject *
await_send_method(MeasuredAwait *w, PyObject *value)
{
    PyObject *result;
    PySendResult r = await_send(w, value, &result);
    return sent(r, result);
}

/* The result of a call to a delegate's throw(): NEXT with what it yielded, RETURN with the
 * StopIteration's value, or ERROR. */
static PySendResult
as_send_result(PyObject *yielded, PyObject **result)
{
    *result = yielded;
    if (yielded != NULL) {
        return PYGEN_NEXT;
    }
    if (!PyErr_ExceptionMatches(PyExc_StopIteration)) {
        return PYGEN_ERROR;
    }
    PyObject *stop = take_exception();
    *result = PyObject_GetAttr(stop, str_value);
    Py_DECREF(stop);
    return *result != NULL ? PYGEN_RETURN : PYGEN_ERROR;
}

/* it.throw(*args), or, for an iterator without throw(), the exception raised right here (as
 * the interpreter does at a `yield from` over such an iterator). */
static PyObject *
throw_into(PyObject *it, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *throw = PyObject_GetAttr(it, str_throw);
    if (throw != NULL) {
        PyObject *result = PyObject_Vectorcall(throw, args, nargs, NULL);
        Py_DECREF(throw);
        return result;
    }
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return NULL;
    }
    PyErr_Clear();
    PyObject *typ = args[0];
    if (PyExceptionInstance_Check(typ)) {
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    }
    else if (PyExceptionClass_Check(typ)) {
        PyErr_SetObject(typ, nargs > 1 ? args[1] : Py_None);
    }
    else {
        PyErr_Format(PyExc_TypeError, "exceptions must be classes or instances deriving from "
                     "BaseException, not %s", Py_TYPE(typ)->tp_name);
    }
    return NULL;
}

static PyObject *
await_throw(MeasuredAwait *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw() takes from 1 to 3 arguments");
        return NULL;
    }
    if (w->state == AWAIT_NEW && !w->running) {
        /* Before the first step the reference's coroutine would not have run: the original's
         * own coroutine takes it (and raises it); another awaitable, through its iterator. */
        if (PyCoro_CheckExact(w->inner)) {
            measurement_over(w);
            return throw_into(w->inner, args, nargs);
        }
        if (pass_through(w) < 0) {
            return NULL;
        }
    }
    if (w->running || w->state != AWAIT_MEASURING) {
        return throw_into(w->inner, args, nargs);
    }
    w->running = 1;
    PyObject *result;
    PySendResult r = as_send_result(throw_into(w->inner, args, nargs), &result);
    return sent(after_step(w, r, &result), result);
}

static PyObject *
close_inner(PyObject *it)
{
    PyObject *close = PyObject_GetAttr(it, str_close);
    if (close == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return NULL;
        }
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *result = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    return result;
}

static PyObject *
await_close(MeasuredAwait *w, PyObject *Py_UNUSED(ignored))
{
    if (w->state == AWAIT_NEW && !w->running) {
        measurement_over(w);
        if (PyCoro_CheckExact(w->inner)) {
            return close_inner(w->inner); /* as closing the original's coroutine would */
        }
        Py_RETURN_NONE; /* not awaited yet: nothing of it started */
    }
    if (w->running || w->state != AWAIT_MEASURING) {
        return close_inner(w->inner);
    }
    /* Closed while suspended in the original: the reference records the GeneratorExit that
     * its own `await` raised, or what the original raised instead. */
    w->running = 1;
    PyObject *closed = close_inner(w->inner);
    w->running = 0;
    PyObject *exc = closed != NULL ? PyObject_CallNoArgs(PyExc_GeneratorExit)
        : take_exception();
    if (exc == NULL) {
        measurement_over(w);
        Py_XDECREF(closed);
        return NULL;
    }
    double now;
    int reported = perf_now(&now) < 0 ? internal_error(w->dunder)
        : failed_call(w, exc, now - w->t0);
    measurement_over(w);
    if (closed == NULL) {
        if (reported < 0) {
            Py_DECREF(exc);
            return NULL;
        }
        give_exception(exc);
        return NULL;
    }
    Py_DECREF(exc);
    if (reported < 0) {
        Py_DECREF(closed);
        return NULL;
    }
    return closed;
}

/* Dropped while suspended in the original: closed, as a coroutine is. */
static void
await_finalize(MeasuredAwait *w)
{
    if (w->state != AWAIT_MEASURING || w->running) {
        return;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *saved = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
#endif
    PyObject *closed = await_close(w, NULL);
    if (closed == NULL) {
        PyErr_WriteUnraisable((PyObject *)w);
    }
    Py_XDECREF(closed);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(saved);
#else
    PyErr_Restore(type, value, tb);
#endif
}

static int
await_traverse(MeasuredAwait *self, visitproc visit, void *arg)
{
    AWAIT_FIELDS(VISIT_FIELD)
    return 0;
}

static int
await_clear(MeasuredAwait *self)
{
    AWAIT_FIELDS(CLEAR_FIELD)
    return 0;
}

static void
await_dealloc(MeasuredAwait *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected by its finalizer */
    }
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    await_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Anything not its own (cr_frame, cr_code, __qualname__ ...) is the original coroutine's. */
static PyObject *
await_getattro(MeasuredAwait *w, PyObject *name)
{
    PyObject *found = PyObject_GenericGetAttr((PyObject *)w, name);
    if (found != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return found;
    }
    PyErr_Clear();
    return PyObject_GetAttr(w->inner, name);
}

static PyObject *
await_class(MeasuredAwait *w, void *Py_UNUSED(closure))
{
    PyTypeObject *type = PyCoro_CheckExact(w->inner) ? Py_TYPE(w->inner) : Py_TYPE(w);
    return Py_NewRef((PyObject *)type);
}

static PyObject *
await_repr(MeasuredAwait *w)
{
    if (PyCoro_CheckExact(w->inner)) {
        return PyObject_Repr(w->inner);
    }
    return PyUnicode_FromFormat("<%s object at %p>", Py_TYPE(w)->tp_name, w);
}

static PyAsyncMethods await_async = {
    .am_await = return_self,
    .am_send = (sendfunc)await_send,
};

static PyMethodDef await_methods[] = {
    {"send", (PyCFunction)await_send_method, METH_O, "send(value), as a coroutine's"},
    {"throw", (PyCFunction)(void (*)(void))await_throw, METH_FASTCALL,
     "throw(exception), as a coroutine's"},
    {"close", (PyCFunction)await_close, METH_NOARGS, "close(), as a coroutine's"},
    {NULL},
};

static PyGetSetDef await_getset[] = {
    {"__class__", (getter)await_class, NULL, "the original coroutine's class", NULL},
    {NULL},
};

static PyTypeObject MeasuredAwaitType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncdiag._speedups.MeasuredAwait",
    .tp_doc = "The original __aenter__/__aexit__'s coroutine, measured (see MeasuredDunder).",
    .tp_basicsize = sizeof(MeasuredAwait),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)await_traverse,
    .tp_clear = (inquiry)await_clear,
    .tp_dealloc = (destructor)await_dealloc,
    .tp_finalize = (destructor)await_finalize,
    .tp_weaklistoffset = offsetof(MeasuredAwait, weakreflist),
    .tp_as_async = &await_async,
    .tp_iter = return_self,
    .tp_iternext = (iternextfunc)await_iternext,
    .tp_getattro = (getattrofunc)await_getattro,
    .tp_repr = (reprfunc)await_repr,
    .tp_methods = await_methods,
    .tp_getset = await_getset,
};

enum { PATH_ERROR = -1, PATH_REFERENCE, PATH_METRICS, PATH_TRACED };

/* How a call whose site is site is measured under rt: PATH_METRICS (site.fast is rt: metrics
 * only), PATH_TRACED (*ops set to rt.blocks, a BlockOps), PATH_REFERENCE (any other case, or an
 * attribute that cannot be read, its error left raised) or PATH_ERROR. A site first used under
 * rt is bound to it (may_bind), then looked at again. The common case reads one slot. */
static int
measuring_path(PyObject *op, PyObject *site, PyObject *rt, PyObject **ops, int may_bind)
{
    PyObject *fast = read_slot(site, &slot_fast);
    if (fast == NULL) {
        return PATH_REFERENCE;
    }
    Py_DECREF(fast); /* only identities are compared: rt and the site hold these */
    if (fast == rt) {
        return PATH_METRICS;
    }
    PyObject *runtime = read_slot(site, &slot_runtime);
    if (runtime == NULL) {
        return PATH_REFERENCE;
    }
    Py_DECREF(runtime);
    if (runtime != rt) {
        if (!may_bind) {
            return PATH_REFERENCE;
        }
        PyObject *bound = PyObject_CallMethodOneArg(rt, str_bind, site);
        if (bound == NULL) {
            return internal_error(op) < 0 ? PATH_ERROR : PATH_REFERENCE;
        }
        Py_DECREF(bound);
        return measuring_path(op, site, rt, ops, 0);
    }
    PyObject *tracing = read_slot(rt, &slot_tracing);
    PyObject *blocks = tracing == NULL ? NULL : read_slot(rt, &slot_blocks);
    Py_XDECREF(tracing);
    if (blocks == NULL) {
        return PATH_REFERENCE;
    }
    if (tracing == Py_True && Py_TYPE(blocks) == &BlockOpsType) {
        *ops = blocks;
        return PATH_TRACED;
    }
    Py_DECREF(blocks);
    return PATH_REFERENCE;
}

/* The call: a MeasuredAwait for the two common cases, the original's own awaitable when not
 * measuring, the reference's coroutine for anything else. */
static PyObject *
dunder_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    MeasuredDunder *dunder = (MeasuredDunder *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || nargs != (dunder->is_exit ? 4 : 1)) {
        return PyObject_Vectorcall(dunder->reference, args, nargsf, kwnames);
    }
    PyObject *obj = args[0];
    PyObject *rt = current_runtime;
    if (rt == NULL || !dunder->active) {
        return PyObject_Vectorcall(dunder->call, args, nargsf, NULL);
    }
    if (dunder->owner != Py_None && (PyObject *)Py_TYPE(obj) != dunder->owner) {
        /* A subclass's instance: measured when `async with` finds this pair on its class, as
         * for the owner's; passed through when the subclass overrides one of the two and
         * reaches this one through super(), so that one block is measured once. */
        PyObject *enter = _PyType_Lookup(Py_TYPE(obj), str_aenter); /* borrowed */
        PyObject *leave = _PyType_Lookup(Py_TYPE(obj), str_aexit);
        if (!PyList_Check(dunder->pair) || PyList_GET_SIZE(dunder->pair) != 2
                || enter != PyList_GET_ITEM(dunder->pair, 0)
                || leave != PyList_GET_ITEM(dunder->pair, 1)) {
            return PyObject_Vectorcall(dunder->call, args, nargsf, NULL);
        }
    }
    PyObject *site = dunder->site != Py_None ? Py_NewRef(dunder->site)
        : PyObject_GetAttr(obj, str_self_site);
    PyObject *ops = NULL;
    int path = site == NULL ? PATH_REFERENCE : measuring_path(op, site, rt, &ops, 1);
    if (path != PATH_METRICS && path != PATH_TRACED) {
        Py_XDECREF(site);
        if (path == PATH_ERROR) {
            return NULL;
        }
        PyErr_Clear(); /* a site that cannot be read: the reference raises it, at the await */
        return PyObject_Vectorcall(dunder->reference, args, nargsf, NULL);
    }
    PyObject *inner = PyObject_Vectorcall(dunder->call, args, nargsf, NULL);
    MeasuredAwait *w = PyObject_GC_New(MeasuredAwait, &MeasuredAwaitType);
    if (w == NULL) {
        Py_XDECREF(inner);
        Py_XDECREF(ops);
        Py_DECREF(site);
        return NULL;
    }
    w->dunder = Py_NewRef(op);
    w->inner = inner;
    w->obj = Py_NewRef(obj);
    w->site = site;
    w->rt = Py_NewRef(rt);
    w->ops = ops;
    w->exc_type = dunder->is_exit ? Py_NewRef(args[1]) : NULL;
    w->task = NULL;
    w->record = NULL;
    w->weakreflist = NULL;
    w->t0 = 0.0;
    w->cancelling = -1;
    w->state = AWAIT_NEW;
    w->running = 0;
    w->suspended = 0;
    w->traced = ops != NULL;
    if (inner == NULL) {
        /* The original raised when called (a plain def, or arguments it does not take): it
         * raises now, as it would without asyncdiag, and counts as a failed call. */
        PyObject *exc = take_exception();
        w->state = AWAIT_DONE;
        if (failed_call(w, exc, 0.0) < 0) {
            Py_DECREF(exc);
        }
        else {
            give_exception(exc);
        }
        w->inner = Py_NewRef(Py_None);
        Py_DECREF(w);
        return NULL;
    }
    PyObject_GC_Track(w);
    return (PyObject *)w;
}

static PyObject *
dunder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"reference", "call", "site", "owner", "is_exit", "check_cancel",
                             "helpers", "pair", NULL};
    PyObject *reference, *call, *site, *owner, *helpers, *pair;
    int is_exit, check_cancel;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOppO!O!:MeasuredDunder", kwlist,
                                     &reference, &call, &site, &owner, &is_exit, &check_cancel,
                                     &PyTuple_Type, &helpers, &PyList_Type, &pair)) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(helpers) != H_COUNT
            || !PyLong_Check(PyTuple_GET_ITEM(helpers, H_MAX_OPEN))) {
        PyErr_SetString(PyExc_ValueError, "helpers: the _proxies objects, in order");
        return NULL;
    }
    if (owner != Py_None && !PyType_Check(owner)) {
        PyErr_SetString(PyExc_TypeError, "owner: a class or None");
        return NULL;
    }
    MeasuredDunder *self = (MeasuredDunder *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = dunder_vectorcall;
    self->reference = Py_NewRef(reference);
    self->call = Py_NewRef(call);
    self->site = Py_NewRef(site);
    self->owner = Py_NewRef(owner);
    self->helpers = Py_NewRef(helpers);
    self->pair = Py_NewRef(pair);
    self->is_exit = (char)is_exit;
    self->check_cancel = (char)check_cancel;
    self->active = 1;
    return (PyObject *)self;
}

/* Bound like a function: a method of the instance. */
static PyObject *
dunder_get(PyObject *self, PyObject *obj, PyObject *Py_UNUSED(type))
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static int
is_own_attribute(PyObject *name)
{
    return PyUnicode_Check(name) && (PyUnicode_Compare(name, str_reference) == 0
                                     || PyUnicode_Compare(name, str_active) == 0);
}

/* Every attribute but its own two is the reference function's. */
static PyObject *
dunder_getattro(MeasuredDunder *self, PyObject *name)
{
    if (is_own_attribute(name)) {
        return PyObject_GenericGetAttr((PyObject *)self, name);
    }
    return PyObject_GetAttr(self->reference, name);
}

static int
dunder_setattro(MeasuredDunder *self, PyObject *name, PyObject *value)
{
    if (is_own_attribute(name)) {
        return PyObject_GenericSetAttr((PyObject *)self, name, value);
    }
    return PyObject_SetAttr(self->reference, name, value);
}

static PyObject *
dunder_repr(MeasuredDunder *self)
{
    return PyObject_Repr(self->reference);
}

static PyMemberDef dunder_members[] = {
    {"reference", T_OBJECT, offsetof(MeasuredDunder, reference), READONLY,
     "the Python wrapper this stands for"},
    {"active", T_BOOL, offsetof(MeasuredDunder, active), 0, "measuring (else passing through)"},
    {NULL},
};

static PyTypeObject MeasuredDunderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncdiag._speedups.MeasuredDunder",
    .tp_doc = "An instrumented __aenter__/__aexit__ (see _proxies.make_cm_methods, whose "
              "Python function it stands for).",
    .tp_basicsize = sizeof(MeasuredDunder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
        | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = dunder_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(MeasuredDunder, vectorcall),
    .tp_traverse = (traverseproc)dunder_traverse,
    .tp_clear = (inquiry)dunder_clear,
    .tp_dealloc = (destructor)dunder_dealloc,
    .tp_descr_get = dunder_get,
    .tp_getattro = (getattrofunc)dunder_getattro,
    .tp_setattro = (setattrofunc)dunder_setattro,
    .tp_repr = (reprfunc)dunder_repr,
    .tp_members = dunder_members,
};


static PyMethodDef speedups_functions[] = {
    {"set_runtime", set_runtime, METH_O,
     "The instrumentation's current Runtime (None when off), as _proxies.RUNTIME."},
    {"fold_into", (PyCFunction)(void (*)(void))fold_into, METH_FASTCALL,
     "Add a list of durations to a histogram point (counts per bucket, sum, min, max)."},
    {"record_since", (PyCFunction)(void (*)(void))record_since, METH_FASTCALL,
     "Append perf_counter() - t0 to a metrics series, folding it when full; "
     "return the duration."},
#ifdef ASYNCDIAG_RUNNING_LOOP
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
    INTERN(str_end, "end");
    INTERN(str_timed, "_timed");
    INTERN(str_asend, "asend");
    INTERN(str_attributes_attr, "_attributes");
    INTERN(str_dict_attr, "_dict");
    INTERN(str_maxlen, "maxlen");
    INTERN(str_max_value_len, "max_value_len");
    INTERN(str_end_time, "_end_time");
    INTERN(str_bind, "bind");
    INTERN(str_aenter, "__aenter__");
    INTERN(str_aexit, "__aexit__");
    INTERN(str_self_site, "_self_site");
    INTERN(str_fast, "fast");
    INTERN(str_runtime, "runtime");
    INTERN(str_tracing, "tracing");
    INTERN(str_blocks, "blocks");
    INTERN(str_enter, "enter");
    INTERN(str_exit_ok, "exit_ok");
    INTERN(str_with_span, "with_span");
    INTERN(str_subject, "subject");
    INTERN(str_slow_teardown, "slow_teardown");
    INTERN(str_cancelling, "cancelling");
    INTERN(str_task, "task");
    INTERN(str_enter_duration, "enter_duration");
    INTERN(str_ok, "ok");
    INTERN(str_throw, "throw");
    INTERN(str_close, "close");
    INTERN(str_value, "value");
    INTERN(str_gi_code, "gi_code");
    INTERN(str_reference, "reference");
    INTERN(str_active, "active");
#ifdef ASYNCDIAG_RUNNING_LOOP
    INTERN(str_running_loop_key, "__asyncio_running_event_loop__");
#endif
#undef INTERN
#ifdef ASYNCDIAG_RUNNING_LOOP
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
    /* Each under the last part of its tp_name (PyModule_AddType readies it first). */
    PyTypeObject *types[] = {&FirstIterHookType, &BlockType, &BlockOpsType, &CountedBaseType,
                             &MeasuredDunderType, &MeasuredAwaitType};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyModule_AddType(module, types[i]) < 0) {
            Py_DECREF(module);
            return NULL;
        }
    }
    return module;
}
