/* ph4.3 lock-free-cas: the interface between the learner's Treiber stack (stack.c) and the
 * lab's driver (driver.c). Do not change this file: the verification builds with its own copy.
 *
 * A node's next pointer is read and written only through node_next() / node_set_next():
 * they are relaxed atomic accesses (another thread may read a node's next while its owner
 * rewrites it - with plain accesses that is a data race) and they are where the driver
 * steps in to replay a precise interleaving (another thread's operations landing between
 * your read of the head and your compare-and-swap).
 */
#ifndef LAB_STACK_H
#define LAB_STACK_H

#include <stdatomic.h>
#include <stdint.h>

typedef struct node {
    struct node *_Atomic next_;  /* use node_next() / node_set_next() */
    uint64_t value;              /* payload: written by whoever holds the node */
    atomic_int held;             /* driver bookkeeping: 1 while a thread holds the node */
} node_t;

typedef struct lfstack lfstack_t;    /* yours: define struct lfstack in stack.c */

lfstack_t *stack_new(void);               /* an empty stack (calloc it) */
void stack_free(lfstack_t *s);            /* frees the stack only, never the nodes */
void stack_push(lfstack_t *s, node_t *n); /* n is held by the caller until pushed */
node_t *stack_pop(lfstack_t *s);          /* NULL when empty */

/* Called inside node_next()/node_set_next(): the driver's way into the middle of your
 * push and pop. Does nothing outside the driver's scripted scenarios. */
void stack_interleave_point(node_t *n, int writing);

static inline node_t *node_next(node_t *n) {
    node_t *next = atomic_load_explicit(&n->next_, memory_order_relaxed);
    stack_interleave_point(n, 0);
    return next;
}

static inline void node_set_next(node_t *n, node_t *next) {
    atomic_store_explicit(&n->next_, next, memory_order_relaxed);
    stack_interleave_point(n, 1);
}

#endif
