/* A Treiber stack with C11 atomics (stdatomic.h) and ABA protection.
 *
 * The interface is c_examples/lock_free_stack/stack.h (shown in the README):
 *   TODO 1  define struct lfstack: the head, a pointer plus a version tag in one
 *           _Atomic 64-bit word (user-space pointers fit in the low 48 bits);
 *   TODO 2  stack_push: link the node to the head you read (node_set_next), then
 *           compare-and-swap the head from what you read to the node, with a new tag;
 *           on failure, retry with the head the CAS reported;
 *   TODO 3  stack_pop: read the head; NULL means empty; read top's next (node_next),
 *           then compare-and-swap the head from what you read to next, with a new tag;
 *   TODO 4  memory orders: release on push's CAS, acquire on pop's reads of the head.
 *
 * Built with -Wall -Wextra -Werror and -fsanitize=thread.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "stack.h"

struct lfstack {
    node_t *head; /* TODO: not atomic, and no tag */
};

lfstack_t *stack_new(void) { return calloc(1, sizeof(lfstack_t)); }

void stack_free(lfstack_t *s) { free(s); }

void stack_push(lfstack_t *s, node_t *n) {
    (void)s;
    (void)n; /* TODO */
}

node_t *stack_pop(lfstack_t *s) {
    (void)s;
    return NULL; /* TODO */
}
