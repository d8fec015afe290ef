/* A Treiber stack: a singly linked list whose head is swapped with compare-and-swap.
 *
 * ABA: pop reads head = A and next = B, then CASes the head from A to B. If meanwhile
 * another thread popped A, popped B and pushed A back, the head is A again and a plain
 * pointer CAS succeeds, installing B - which that other thread still holds. So the head
 * carries a version tag next to the pointer, bumped by every successful CAS: the stale
 * CAS sees the same pointer but another tag, fails, and retries.
 *
 * The tag lives in the top 16 bits of one 64-bit word (x86-64 and AArch64 user-space
 * pointers fit in 48 bits), so a single-word CAS covers pointer and tag together.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "stack.h"

#define PTR_BITS 48
#define PTR_MASK ((UINT64_C(1) << PTR_BITS) - 1)

struct lfstack {
    _Atomic uint64_t head; /* tag << 48 | pointer */
};

static node_t *ptr_of(uint64_t word) { return (node_t *)(uintptr_t)(word & PTR_MASK); }

static uint64_t pack(node_t *n, uint64_t old) {
    uint64_t tag = (old >> PTR_BITS) + 1; /* the next version; wraps after 65,536 CASes */
    return (tag << PTR_BITS) | ((uint64_t)(uintptr_t)n & PTR_MASK);
}

lfstack_t *stack_new(void) { return calloc(1, sizeof(lfstack_t)); }

void stack_free(lfstack_t *s) { free(s); }

void stack_push(lfstack_t *s, node_t *n) {
    uint64_t old = atomic_load_explicit(&s->head, memory_order_relaxed);
    do {
        node_set_next(n, ptr_of(old));
        /* release: whatever the pusher wrote into the node is visible to the popper */
    } while (!atomic_compare_exchange_weak_explicit(&s->head, &old, pack(n, old),
                                                    memory_order_release,
                                                    memory_order_relaxed));
}

node_t *stack_pop(lfstack_t *s) {
    uint64_t old = atomic_load_explicit(&s->head, memory_order_acquire);
    for (;;) {
        node_t *top = ptr_of(old);
        if (top == NULL) return NULL;
        node_t *next = node_next(top);
        /* acquire: pairs with the release of the push that published `top` */
        if (atomic_compare_exchange_weak_explicit(&s->head, &old, pack(next, old),
                                                  memory_order_acquire,
                                                  memory_order_acquire))
            return top;
    }
}
