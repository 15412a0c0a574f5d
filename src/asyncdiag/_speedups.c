/* asyncdiag's hot paths in C, each with a Python reference that is also its fallback when the
 * extension is not built (tests run both):
 *
 *   FirstIterHook   the asyncgen tracker's first-iteration hook   (_asyncgens, this part below)
 *   running_loop    3.10/3.11 running-loop lookup without getpid() (_loops)
 *   record_since    one awaited duration into a metrics series     (_telemetry)
 *   BlockOps, Block a traced async with's bookkeeping              (_proxies._open_span...)
 *   CountedBase     counted generator requests                     (_proxies._CountedRequests)
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


/* ---- Traced blocks --------------------------------------------------------------------------
 *
 * The common case of a traced `async with` (a task is running), in C: the bookkeeping around the SDK's own calls is most of what a
 * traced block adds over the SDK's span, and as Python bytecode it cost about as much again
 * as the span's own Python code. The Python versions in _proxies (_open_span, _Open,
 * _pop_open, _end_with_span) are the reference, the fallback, and what every other case
 * uses; they read and write Block records as they do _Open ones (the same attributes).
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

static PyObject *
current_task_of(BlockOps *self)
{
    PyObject *loop = PyObject_CallNoArgs(self->running_loop);
    if (loop == NULL) {
        return NULL;
    }
    if (loop == Py_None) {
        return loop;
    }
    PyObject *task = running_task_of(self->task_of, loop);
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
    PyObject *task = current_task_of(self);
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

static PyObject *
counted_aiter(PyObject *self)
{
    return Py_NewRef(self);
}

static PyAsyncMethods counted_async = {
    .am_aiter = counted_aiter,
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

static PyMethodDef speedups_functions[] = {
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
#ifdef ASYNCDIAG_RUNNING_LOOP
    INTERN(str_running_loop_key, "__asyncio_running_event_loop__");
#endif
#undef INTERN
    if (PyType_Ready(&FirstIterHookType) < 0 || PyType_Ready(&BlockType) < 0
            || PyType_Ready(&BlockOpsType) < 0 || PyType_Ready(&CountedBaseType) < 0) {
        return NULL;
    }
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
    Py_INCREF(&FirstIterHookType);
    if (PyModule_AddObject(module, "FirstIterHook", (PyObject *)&FirstIterHookType) < 0) {
        Py_DECREF(&FirstIterHookType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&BlockType);
    if (PyModule_AddObject(module, "Block", (PyObject *)&BlockType) < 0) {
        Py_DECREF(&BlockType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&BlockOpsType);
    if (PyModule_AddObject(module, "BlockOps", (PyObject *)&BlockOpsType) < 0) {
        Py_DECREF(&BlockOpsType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&CountedBaseType);
    if (PyModule_AddObject(module, "CountedBase", (PyObject *)&CountedBaseType) < 0) {
        Py_DECREF(&CountedBaseType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
