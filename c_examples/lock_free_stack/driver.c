/* ph4.3 lock-free-cas: the lab's driver around the learner's Treiber stack (stack.c).
 *
 *   lock_free_stack empty        pop on an empty stack, then one push and two pops
 *   lock_free_stack new_on_reused_memory   stack_new() over freed blocks full of stale
 *                                bytes: its first pop must return NULL
 *   lock_free_stack aba          the ABA interleaving, replayed inside the learner's pop
 *   lock_free_stack pop_race     a push lands between pop's read of the head and its CAS
 *   lock_free_stack push_race    a pop lands between push's read of the head and its CAS
 *   lock_free_stack pop_last     the stack holds one node; another pop takes it between
 *                                pop's read of the head (not empty) and its CAS
 *   lock_free_stack aba_wrap     ABA again, with 256 successful CASes in between (a tag
 *                                of 8 bits or fewer - the pointer's alignment bits - wraps)
 *   lock_free_stack aba_at_cas   ABA again, landing right before pop's CAS: after every
 *                                check pop makes (a tag kept in a word of its own and
 *                                checked before a pointer-only CAS does not see it)
 *   lock_free_stack empty_aba    ABA through an empty stack: inside your pop the other
 *                                thread empties the stack and refills it (the version tag
 *                                must keep growing: a tag restarted on empty comes back)
 *   lock_free_stack push_publish a pop lands right after push's successful CAS: the node
 *                                must be linked before the CAS publishes it
 *   lock_free_stack push_retry_aba   your push's first CAS fails and it retries, while a
 *   lock_free_stack pop_retry_aba    third thread's pop waits right before its CAS: the
 *                                word your retry installs must carry a tag newer than the
 *                                head it replaced (recomputed from the re-read head, not
 *                                from the first read), or that stale CAS matches it later
 *   lock_free_stack free         stack_free on a stack that still holds (static) nodes:
 *                                the stack's memory is released, the nodes untouched
 *   lock_free_stack two_stacks   two stacks alive at once, each with its own contents
 *   lock_free_stack stress N     4 threads x N rounds of pop, pop, push, push over 64 nodes
 *
 * The scripted scenarios run on one thread: stack_interleave_point() (called by
 * node_next()/node_set_next() in the middle of the learner's operation) runs "the other
 * thread's" operations right there, so the interleaving happens every time, not by luck.
 * The moment right before a compare-and-swap is reached the same way: ThreadSanitizer's
 * instrumentation turns every CAS into a call of __tsan_atomic{64,128}_compare_exchange_*,
 * and the build links those calls to the wrappers below (ld --wrap, see rules.mk).
 * The *_retry_aba scenarios need a pop that overlaps yours without nesting in it (it reads
 * the head inside your operation and CASes after it): a real third thread, which runs only
 * while the main thread waits for it, so the order is still the script's.
 * Each prints "ok ..." and exits 0, or prints "FAIL <what was seen>" and exits 1; a line
 * "step ..." says when the other thread's operations are done and yours resumes (so a
 * crash after it is known to be your operation's, on its retry).
 * Built with -fsanitize=thread: the stress run must also produce no ThreadSanitizer report.
 */
#include <pthread.h>
#include <poll.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stack.h"

#define POOL 64
#define THREADS 4

/* ThreadSanitizer's allocator: the bytes malloc'd and not yet freed (its runtime exports it;
 * <sanitizer/allocator_interface.h> declares it, but not every toolchain ships the header). */
size_t __sanitizer_get_current_allocated_bytes(void);

static node_t nodes[8];
static const char *names = "ABCDEFGH";
static lfstack_t *S;

static char name_of(node_t *n) {
    if (n == NULL) return '-';
    if (n >= nodes && n < nodes + 8) return names[n - nodes];
    return '?';
}

/* ---- scripted interleavings ------------------------------------------------------------ */

/* What "the other thread" does when it runs in the middle of your operation. */
enum other { ABA, ABA_WRAP, PUSH_D, POP_ONE, STEPS };
/* Where in your operation: at its node_next() (node_set_next() in a push), between its
 * read of the head and its CAS; right before its (first) compare-and-swap; or right after
 * the first compare-and-swap (or exchange) that succeeds, when the head is published. */
enum moment { AT_LINK, AT_CAS, AFTER_CAS };

/* The scripted scenarios: from the stack `start` (top first), your pop (or your push of D)
 * runs with "the other thread's" operations landing at `moment`. Afterwards every node of
 * `expected` must be accounted for exactly once.
 * STEPS spells the other thread's operations out, in `during` (inside your operation) and
 * `after` (once it returned): 'o' pops a node (the other thread holds it), a letter pushes
 * that node back, 'S' starts a third thread's pop, which reads the head and stops right
 * before its CAS, and 'R' lets that CAS go and waits for the pop to end. */
static const struct script {
    const char *name, *start;
    int push;          /* your operation: push D (1) or pop (0) */
    enum moment moment;
    enum other other;  /* what the other thread does in its middle */
    const char *expected;
    const char *during, *after; /* STEPS only */
    int may_empty;     /* the stack is empty at some moment of your pop: NULL is an answer */
} scripts[] = {
    {"pop_race", "ABC", 0, AT_LINK, PUSH_D, "ABCD", NULL, NULL, 0},
    {"push_race", "AB", 1, AT_LINK, POP_ONE, "ABD", NULL, NULL, 0},
    {"pop_last", "A", 0, AT_LINK, POP_ONE, "A", NULL, NULL, 1}, /* your retry must see NULL */
    {"aba", "ABC", 0, AT_LINK, ABA, "ABC", NULL, NULL, 0},
    {"aba_wrap", "ABC", 0, AT_LINK, ABA_WRAP, "ABCE", NULL, NULL, 0},
    {"aba_at_cas", "ABC", 0, AT_CAS, ABA, "ABC", NULL, NULL, 0},
    /* Your push of D has just installed the head: a pop lands there and reads D's next
     * (D comes from a fresh pool, its next NULL). Linked only after the CAS, D takes A and
     * B with it: they are lost. */
    {"push_publish", "AB", 1, AFTER_CAS, POP_ONE, "ABD", NULL, NULL, 0},
    /* (A,t): pop A, push A -> (A,t+2), the third pop reads it (next B); pop A, pop B, push A
     * -> (A,t+5) A->C. Your push of D retries: (D,t+6) (a tag from the first read: (D,t+1)).
     * Pop D -> (A,t+7) (stale: (A,t+2), the third pop's expected value: it installs B,
     * which the other thread holds). */
    {"push_retry_aba", "ABC", 1, AT_LINK, STEPS, "ABCD", "oASooA", "oR", 0},
    /* (A,t): pop A -> (B,t+1), the third pop reads it (next C); pop B, pop C, push B,
     * push A -> (A,t+5) A->B->D. Your pop retries: (B,t+6) (a tag from the first read:
     * (B,t+1), the third pop's expected value: it installs C, which the other thread
     * holds). */
    {"pop_retry_aba", "ABCD", 0, AT_LINK, STEPS, "ABCD", "oSooBA", "R", 0},
    /* (A,t) A->C: your pop reads it (next C); pop A, pop C - the stack runs empty - push B,
     * push A -> (A,t+4) A->B. A version restarted on the empty stack (the head back to 0,
     * or a push onto an empty stack starting at tag 1) is (A,t) again: your stale CAS
     * matches and installs C, which the other thread holds. */
    {"empty_aba", "AC", 0, AT_LINK, STEPS, "ABC", "ooBA", NULL, 1},
};

static const struct script *armed; /* the scenario waiting for its moment */
static node_t *other_holds[8]; /* nodes "the other thread" popped and still holds */
static int other_count = 0;
static char other_log[256];
static atomic_int in_other;    /* 1 while "the other thread's" operations run inside yours */

/* ---- the third thread: a pop stopped right before its CAS ----------------------------- */

static pthread_t third;
static int third_started;
static node_t *third_returned;
static _Thread_local int i_am_third;
static node_t *third_top;          /* the top the third thread's pop read */
static atomic_int third_stops;     /* 1: the third thread's next CAS waits for 'R' */
static atomic_int third_stopped;   /* 1: it did stop before a CAS (0: its pop made none) */
static sem_t third_paused, third_go; /* paused: at its CAS, or done */

static void *third_pop(void *arg) {
    (void)arg;
    i_am_third = 1;
    third_returned = stack_pop(S);
    if (atomic_exchange(&third_stops, 0)) sem_post(&third_paused); /* it never CASed */
    return NULL;
}

static void third_before_cas(void) {
    if (!i_am_third || !atomic_exchange(&third_stops, 0)) return;
    atomic_store(&third_stopped, 1);
    sem_post(&third_paused);
    sem_wait(&third_go);
}

static void log_step(const char *what, char node) { /* what: "pop %c", ... */
    size_t k = strlen(other_log);
    if (k > 0 && other_log[k - 1] != ' ' && what[0] != ';')
        snprintf(other_log + k, sizeof other_log - k, ", ");
    k = strlen(other_log);
    snprintf(other_log + k, sizeof other_log - k, what, node);
}

/* The other thread's operations, spelled as in the scripts' `during` and `after`. */
static void run_steps(const char *steps) {
    for (const char *p = steps; *p; p++) {
        if (*p == 'o') {
            node_t *x = stack_pop(S);
            other_holds[other_count++] = x;
            log_step("pop %c", name_of(x));
        } else if (*p == 'S') {
            atomic_store(&third_stops, 1);
            third_started = pthread_create(&third, NULL, third_pop, NULL) == 0;
            if (!third_started) { puts("FAIL the driver could not start a thread"); exit(1); }
            sem_wait(&third_paused);
            log_step("a third thread's pop read the head (top %c) and stopped before its CAS",
                     name_of(third_top));
        } else if (*p == 'R') {
            if (!third_started) continue;
            if (atomic_load(&third_stopped)) sem_post(&third_go);
            pthread_join(third, NULL);
            third_started = 0;
            other_holds[other_count++] = third_returned;
            log_step("the third thread's CAS went on: its pop returned %c",
                     name_of(third_returned));
        } else {
            node_t *n = &nodes[strchr(names, *p) - names];
            for (int i = 0; i < other_count; i++)
                if (other_holds[i] == n) other_holds[i] = other_holds[--other_count];
            stack_push(S, n);
            log_step("push %c", *p);
        }
    }
}

static void other_thread_runs(void) {
    const struct script *script = armed;
    armed = NULL; /* once; the other thread's own operations run unhooked */
    atomic_store(&in_other, 1);
    if (script->other == ABA_WRAP) {
        /* pop A, pop B, push E, 126 x (pop E, push E), push A: 256 successful CASes */
        node_t *x = stack_pop(S);
        node_t *y = stack_pop(S);
        stack_push(S, &nodes[4]);
        for (int i = 0; i < 126; i++) stack_push(S, stack_pop(S));
        stack_push(S, x);
        other_holds[other_count++] = y;
        snprintf(other_log, sizeof other_log, "pop %c, pop %c, push E, 126 x (pop E, push E), "
                 "push %c: 256 successful CASes", name_of(x), name_of(y), name_of(x));
    } else if (script->other == ABA) {
        node_t *x = stack_pop(S);
        node_t *y = stack_pop(S);
        stack_push(S, x);
        other_holds[other_count++] = y;
        snprintf(other_log, sizeof other_log, "pop %c, pop %c, push %c", name_of(x),
                 name_of(y), name_of(x));
    } else if (script->other == PUSH_D) {
        stack_push(S, &nodes[3]);
        snprintf(other_log, sizeof other_log, "push D");
    } else if (script->other == POP_ONE) {
        node_t *x = stack_pop(S);
        other_holds[other_count++] = x;
        snprintf(other_log, sizeof other_log, "pop %c", name_of(x));
    } else if (script->other == STEPS) {
        other_log[0] = '\0';
        run_steps(script->during);
    }
    atomic_store(&in_other, 0);
    printf("step %s: the other thread did %s; your %s resumes\n", script->name, other_log,
           script->push ? "push" : "pop");
}

void stack_interleave_point(node_t *n, int writing) {
    if (i_am_third && third_top == NULL) third_top = n;
    if (armed != NULL && armed->moment == AT_LINK && writing == armed->push)
        other_thread_runs();
}

static void before_cas(void) {
    third_before_cas();
    if (armed != NULL && armed->moment == AT_CAS && !i_am_third) other_thread_runs();
}

static void after_cas(int swapped) {
    if (swapped && armed != NULL && armed->moment == AFTER_CAS && !i_am_third)
        other_thread_runs();
}

/* The CAS wrappers (ThreadSanitizer's memory orders are an int-sized enum). */
#define CAS_WRAPPERS(BITS, T)                                                                 \
    int __real___tsan_atomic##BITS##_compare_exchange_strong(volatile T *, T *, T, int, int); \
    int __real___tsan_atomic##BITS##_compare_exchange_weak(volatile T *, T *, T, int, int);   \
    T __real___tsan_atomic##BITS##_compare_exchange_val(volatile T *, T, T, int, int);        \
    int __wrap___tsan_atomic##BITS##_compare_exchange_strong(volatile T *a, T *c, T v,        \
                                                             int mo, int fail_mo);            \
    int __wrap___tsan_atomic##BITS##_compare_exchange_strong(volatile T *a, T *c, T v,        \
                                                             int mo, int fail_mo) {           \
        before_cas();                                                                         \
        int ok = __real___tsan_atomic##BITS##_compare_exchange_strong(a, c, v, mo, fail_mo);  \
        after_cas(ok);                                                                        \
        return ok;                                                                            \
    }                                                                                         \
    int __wrap___tsan_atomic##BITS##_compare_exchange_weak(volatile T *a, T *c, T v, int mo,  \
                                                           int fail_mo);                      \
    int __wrap___tsan_atomic##BITS##_compare_exchange_weak(volatile T *a, T *c, T v, int mo,  \
                                                           int fail_mo) {                     \
        before_cas();                                                                         \
        int ok = __real___tsan_atomic##BITS##_compare_exchange_weak(a, c, v, mo, fail_mo);    \
        after_cas(ok);                                                                        \
        return ok;                                                                            \
    }                                                                                         \
    T __wrap___tsan_atomic##BITS##_compare_exchange_val(volatile T *a, T c, T v, int mo,      \
                                                        int fail_mo);                         \
    T __wrap___tsan_atomic##BITS##_compare_exchange_val(volatile T *a, T c, T v, int mo,      \
                                                        int fail_mo) {                        \
        before_cas();                                                                         \
        T seen = __real___tsan_atomic##BITS##_compare_exchange_val(a, c, v, mo, fail_mo);     \
        after_cas(seen == c);                                                                 \
        return seen;                                                                          \
    }                                                                                         \
    T __real___tsan_atomic##BITS##_exchange(volatile T *, T, int);                            \
    T __wrap___tsan_atomic##BITS##_exchange(volatile T *a, T v, int mo);                      \
    T __wrap___tsan_atomic##BITS##_exchange(volatile T *a, T v, int mo) {                     \
        T old = __real___tsan_atomic##BITS##_exchange(a, v, mo);                              \
        after_cas(1); /* an exchange publishes as a successful CAS does */                    \
        return old;                                                                           \
    }

CAS_WRAPPERS(64, long)
CAS_WRAPPERS(128, __int128)

/* A safety net for the scripted scenarios (each takes microseconds): if one has not
 * finished after 5 s, say where it hangs instead of leaving the test to time out. */
static void say(const char *msg) {
    ssize_t w = write(1, msg, strlen(msg));
    (void)w;
}

static int wake[2]; /* a byte on wake[1] ends the watchdog before its 5 s */

static void *watchdog(void *arg) {
    (void)arg;
    struct pollfd p = {.fd = wake[0], .events = POLLIN};
    if (poll(&p, 1, 5000) > 0) return NULL;
    if (atomic_load(&in_other))
        say("FAIL hang: \"the other thread's\" operation, run in the middle of yours, never "
            "finished: it waits for something only your unfinished operation can release "
            "(a lock or spinlock around push/pop?). Lock-free means no operation ever waits "
            "for another: a thread preempted mid-operation must not stop the rest.\n");
    else
        say("FAIL hang: your operation never finished: a CAS loop that never succeeds "
            "(retrying with an expected value that is never refreshed?) or a cycle in the "
            "list\n");
    _exit(1);
}

/* Pop everything that is left (at most 16, in case the list now has a cycle). */
static int drain(char *out) {
    int k = 0;
    node_t *n;
    while (k < 16 && (n = stack_pop(S)) != NULL) out[k++] = name_of(n);
    out[k] = '\0';
    return k;
}

static void fresh(const char *content) { /* content top first, e.g. "ABC" */
    S = stack_new();
    if (S == NULL) { puts("FAIL stack_new() returned NULL"); exit(1); }
    memset(nodes, 0, sizeof nodes);
    for (int i = (int)strlen(content) - 1; i >= 0; i--)
        stack_push(S, &nodes[strchr(names, content[i]) - names]);
}

/* Every node of `expected` must be accounted for exactly once among: what the scenario's
 * main operation returned, what the other thread holds, and what is left on the stack. */
static int account(const char *scenario, const char *expected, node_t *returned,
                   const char *left) {
    char all[64];
    int k = 0;
    if (returned) all[k++] = name_of(returned);
    for (int i = 0; i < other_count; i++) all[k++] = name_of(other_holds[i]);
    for (const char *p = left; *p; p++) all[k++] = *p;
    all[k] = '\0';
    for (const char *p = expected; *p; p++) {
        int seen = 0;
        for (int i = 0; i < k; i++) seen += all[i] == *p;
        if (seen != 1) {
            printf("FAIL %s: node %c %s (the other thread did: %s; your operation returned "
                   "%c; left on the stack, top first: %s)\n", scenario, *p,
                   seen == 0 ? "was lost" : "is held twice (duplicated)", other_log,
                   name_of(returned), *left ? left : "nothing");
            return 1;
        }
    }
    printf("ok %s: other thread did %s; returned %c; left %s\n", scenario, other_log,
           name_of(returned), *left ? left : "nothing");
    return 0;
}

/* Two stacks at once: each must be a stack of its own (nothing shared in static state). */
static int run_two_stacks(void) {
    lfstack_t *first = stack_new(), *second = stack_new();
    if (first == NULL || second == NULL) { puts("FAIL stack_new() returned NULL"); return 1; }
    memset(nodes, 0, sizeof nodes);
    stack_push(first, &nodes[0]);
    stack_push(second, &nodes[1]);
    node_t *a = stack_pop(first), *none = stack_pop(first), *b = stack_pop(second);
    if (first == second || a != &nodes[0] || none != NULL || b != &nodes[1]) {
        printf("FAIL two_stacks: two stacks from two stack_new() calls share their contents: "
               "A pushed onto the first and B onto the second, then the first's pops gave %c "
               "and %c (expected A, then - for empty) and the second's gave %c (expected B)%s: "
               "keep the head in struct lfstack, which each stack_new() allocates afresh, "
               "never in a static or global variable\n", name_of(a), name_of(none),
               name_of(b), first == second ? " - stack_new() returned the same stack twice"
               : "");
        return 1;
    }
    stack_free(first);
    stack_free(second);
    puts("ok two_stacks");
    return 0;
}

static int run_empty(void) {
    S = stack_new();
    if (S == NULL) { puts("FAIL stack_new() returned NULL"); return 1; }
    node_t *n = stack_pop(S);
    if (n != NULL) { puts("FAIL empty: pop on an empty stack did not return NULL"); return 1; }
    stack_push(S, &nodes[0]);
    node_t *a = stack_pop(S);
    puts("step empty: pushed A and popped it: the stack is empty again (its head word need "
         "not be the one stack_new() gave: the version moved on); one more pop follows");
    node_t *b = stack_pop(S);
    if (a != &nodes[0] || b != NULL) {
        printf("FAIL empty: push A then two pops gave %c and %c, expected A and -\n",
               name_of(a), name_of(b));
        return 1;
    }
    stack_free(S);
    puts("ok empty");
    return 0;
}


/* stack_new() on memory that was used before: malloc() hands back freed blocks as they
 * were. The driver fills and frees blocks of every small size first (ThreadSanitizer's
 * allocator reuses the last freed block of a size class), each word the address of H, a
 * node nobody pushes: a head left as malloc() found it makes a "new" stack that holds H. */
static int run_new_on_reused_memory(void) {
    void *used[128];
    for (int i = 0; i < 128; i++) {
        size_t size = 8 * (size_t)(i + 1);
        uint64_t *block = malloc(size);
        if (block == NULL) { puts("FAIL the driver could not allocate"); return 1; }
        for (size_t w = 0; w < size / 8; w++) block[w] = (uint64_t)(uintptr_t)&nodes[7];
        used[i] = block;
    }
    for (int i = 0; i < 128; i++) free(used[i]);
    memset(nodes, 0, sizeof nodes);
    puts("step new_on_reused_memory: blocks of every small size were filled with the address "
         "of node H and freed; stack_new() and a pop of the new stack follow");
    S = stack_new();
    if (S == NULL) { puts("FAIL stack_new() returned NULL"); return 1; }
    node_t *n = stack_pop(S);
    if (n != NULL) {
        printf("FAIL new_on_reused_memory: stack_new() must give an empty stack whatever the "
               "memory held before: the first pop of a new stack returned %c, a node nobody "
               "pushed (the head was left as malloc() found it, in a block freed earlier)\n",
               name_of(n));
        return 1;
    }
    stack_free(S);
    puts("ok new_on_reused_memory");
    return 0;
}

/* stack_free frees the stack only: the nodes are the caller's (here static: free() of one
 * aborts the process). */
static int run_free(void) {
    size_t before = __sanitizer_get_current_allocated_bytes();
    S = stack_new();
    if (S == NULL) { puts("FAIL stack_new() returned NULL"); return 1; }
    memset(nodes, 0, sizeof nodes);
    stack_push(S, &nodes[1]);
    stack_push(S, &nodes[0]);
    stack_free(S);
    if (nodes[0].value != 0 || nodes[1].value != 0) {
        puts("FAIL free: stack_free() wrote into the nodes it still held");
        return 1;
    }
    size_t after = __sanitizer_get_current_allocated_bytes();
    if (after > before) {
        printf("FAIL free: stack_free() left %zu bytes that stack_new() allocated still "
               "allocated: it must release the stack's own memory (free(s), and anything "
               "else stack_new() allocated for it), every time - a program that makes and "
               "frees stacks leaks without end\n", after - before);
        return 1;
    }
    puts("ok free");
    return 0;
}

static int run_scripted(const struct script *script) {
    pthread_t dog;
    if (sem_init(&third_paused, 0, 0) < 0 || sem_init(&third_go, 0, 0) < 0 || pipe(wake) < 0
        || pthread_create(&dog, NULL, watchdog, NULL) != 0) {
        puts("FAIL the driver could not start its watchdog");
        return 1;
    }
    char left[32];
    node_t *returned = NULL;
    other_count = 0;
    strcpy(other_log, "nothing (your operation never read a node's next pointer)");
    fresh(script->start);
    armed = script;
    if (script->push) stack_push(S, &nodes[3]);
    else returned = stack_pop(S);
    if (script->after != NULL && armed == NULL) { /* the other thread ran inside yours */
        if (script->push) log_step("; your push returned; then ", 0);
        else log_step("; your pop returned %c; then ", name_of(returned));
        char *then = other_log + strlen(other_log);
        atomic_store(&in_other, 1);
        run_steps(script->after);
        atomic_store(&in_other, 0);
        printf("step %s: after your %s: %s\n", script->name,
               script->push ? "push" : "pop", then);
    }
    armed = NULL;
    drain(left);
    int failed = account(script->name, script->expected, returned, left);
    if (!failed && !script->push && returned == NULL && !script->may_empty) {
        printf("FAIL %s: your pop returned NULL, yet the stack was never empty while it ran "
               "(the other thread did: %s; left on the stack, top first: %s): a failed "
               "compare-and-swap only means another thread changed the head first - "
               "retry from the head it handed back; NULL means the head you read was NULL\n",
               script->name, other_log, left);
        failed = 1;
    }
    ssize_t w = write(wake[1], "", 1);
    (void)w;
    pthread_join(dog, NULL);
    return failed;
}

/* ---- stress ---------------------------------------------------------------------------- */

static node_t pool[POOL];
static long rounds;
static atomic_long pops, empties;
static atomic_int broken;

static void take(node_t *n) {
    /* relaxed on purpose: only the stack's own ordering may make the value write safe */
    if (atomic_exchange_explicit(&n->held, 1, memory_order_relaxed) != 0) {
        if (!atomic_exchange(&broken, 1))
            printf("FAIL stress: node %ld was popped while another thread held it "
                   "(duplicated)\n", (long)(n - pool));
    }
    n->value += 1; /* plain write: safe only if the pop synchronized with the last push */
    atomic_fetch_add_explicit(&pops, 1, memory_order_relaxed);
}

static void give(node_t *n) {
    atomic_store_explicit(&n->held, 0, memory_order_relaxed);
    stack_push(S, n);
}

static void *worker(void *arg) {
    (void)arg;
    for (long i = 0; i < rounds && !atomic_load(&broken); i++) {
        node_t *a = stack_pop(S);
        if (a) take(a);
        node_t *b = stack_pop(S);
        if (b) take(b);
        if (!a || !b) atomic_fetch_add_explicit(&empties, 1, memory_order_relaxed);
        if (a) give(a);
        if (b) give(b);
    }
    return NULL;
}

static int run_stress(long n) {
    rounds = n;
    S = stack_new();
    if (S == NULL) { puts("FAIL stack_new() returned NULL"); return 1; }
    for (int i = 0; i < POOL; i++) stack_push(S, &pool[i]);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    if (atomic_load(&broken)) return 1;
    if (atomic_load(&empties) > 0) {
        printf("FAIL stress: %ld rounds saw a pop return NULL, yet at least %d of the %d nodes "
               "were on the stack all along (each of %d threads holds 2 at most): a pop that "
               "loses a compare-and-swap race must retry, not report an empty stack\n",
               atomic_load(&empties), POOL - 2 * THREADS, POOL, THREADS);
        return 1;
    }
    int seen[POOL] = {0}, count = 0;
    node_t *x;
    while (count <= POOL && (x = stack_pop(S)) != NULL) {
        if (x < pool || x >= pool + POOL) { puts("FAIL stress: popped a foreign pointer"); return 1; }
        seen[x - pool]++, count++;
    }
    uint64_t sum = 0;
    for (int i = 0; i < POOL; i++) sum += pool[i].value;
    long expect = atomic_load(&pops);
    if (count != POOL) {
        printf("FAIL stress: %d nodes left on the stack after every thread pushed back what "
               "it popped, expected %d\n", count, POOL);
        return 1;
    }
    for (int i = 0; i < POOL; i++)
        if (seen[i] != 1) { printf("FAIL stress: node %d on the stack %d times\n", i, seen[i]); return 1; }
    if (sum != (uint64_t)expect) {
        printf("FAIL stress: checksum %llu, expected %ld (one increment per pop)\n",
               (unsigned long long)sum, expect);
        return 1;
    }
    stack_free(S);
    printf("ok stress: %ld pops over %d threads, checksum %llu\n", expect, THREADS,
           (unsigned long long)sum);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2) {
        fputs("usage: lock_free_stack empty|new_on_reused_memory|free|two_stacks|stress N", stderr);
        for (size_t i = 0; i < sizeof scripts / sizeof scripts[0]; i++)
            fprintf(stderr, "|%s", scripts[i].name);
        fputs("\n", stderr);
        return 2;
    }
    if (!strcmp(argv[1], "empty")) return run_empty();
    if (!strcmp(argv[1], "new_on_reused_memory")) return run_new_on_reused_memory();
    if (!strcmp(argv[1], "free")) return run_free();
    if (!strcmp(argv[1], "two_stacks")) return run_two_stacks();
    for (size_t i = 0; i < sizeof scripts / sizeof scripts[0]; i++)
        if (!strcmp(argv[1], scripts[i].name)) return run_scripted(&scripts[i]);
    if (!strcmp(argv[1], "stress") && argc > 2) return run_stress(atol(argv[2]));
    return 2;
}
