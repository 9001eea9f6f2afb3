/* Best-fit packing with crop, compiled (parcae_megatron/data/packing.py loads it with ctypes).
 *
 * The same rows as the reference algorithm (tests/test_bestfit.py), in O(1)-ish per pick:
 * the buffer keeps one FIFO (a linked list over buffer slots) per length 1..L (L = row
 * length), so "the earliest-arrived document of length n" is a list head, and a two-level
 * bitset of the lengths present answers "the longest length <= r" and "the shortest length"
 * with a few count-leading/trailing-zero instructions. Documents longer than a row can only
 * ever be cropped (when nothing shorter is buffered); they wait in a min-heap on
 * (length, arrival).
 *
 * The packer is resumable: pack() returns when it needs more of the document stream, when the
 * output arrays are full, when max_rows rows are done, or when the stream (final) is drained.
 * Its state lives in a Packer that the caller owns (bf_new / bf_free).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { NEED_INPUT = 0, MAX_ROWS = 1, OUTPUT_FULL = 2, DONE = 3, WIDEN = 4 };

typedef struct {
    int64_t L, B, held, arrival, cropped;
    int64_t pos, rows, parts, row_start;  /* the row in progress and the output so far */
    int32_t *head, *tail;                 /* per length 1..L: first / last slot, -1 = none */
    int32_t *next, *doc, *free_slot;      /* per buffer slot */
    int64_t nfree;
    uint64_t *bits, *summary;             /* lengths present; words of bits that are nonzero */
    int64_t nwords, nsummary;
    int64_t *heap_len, *heap_arrival;     /* documents longer than a row */
    int32_t *heap_doc;
    int64_t nheap;
} Packer;

void bf_free(Packer *p) {
    if (!p) return;
    free(p->head); free(p->tail); free(p->next); free(p->doc); free(p->free_slot);
    free(p->bits); free(p->summary); free(p->heap_len); free(p->heap_arrival);
    free(p->heap_doc); free(p);
}

Packer *bf_new(int64_t row_length, int64_t buffer_size) {
    Packer *p = calloc(1, sizeof(Packer));
    if (!p) return NULL;
    p->L = row_length;
    p->B = buffer_size;
    p->nwords = row_length / 64 + 1;
    p->nsummary = p->nwords / 64 + 1;
    p->head = malloc((row_length + 1) * sizeof(int32_t));
    p->tail = malloc((row_length + 1) * sizeof(int32_t));
    p->next = malloc(buffer_size * sizeof(int32_t));
    p->doc = malloc(buffer_size * sizeof(int32_t));
    p->free_slot = malloc(buffer_size * sizeof(int32_t));
    p->bits = calloc(p->nwords, sizeof(uint64_t));
    p->summary = calloc(p->nsummary, sizeof(uint64_t));
    p->heap_len = malloc(buffer_size * sizeof(int64_t));
    p->heap_arrival = malloc(buffer_size * sizeof(int64_t));
    p->heap_doc = malloc(buffer_size * sizeof(int32_t));
    if (!p->head || !p->tail || !p->next || !p->doc || !p->free_slot || !p->bits
        || !p->summary || !p->heap_len || !p->heap_arrival || !p->heap_doc) {
        bf_free(p);
        return NULL;
    }
    memset(p->head, -1, (row_length + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < buffer_size; i++) p->free_slot[i] = (int32_t)(buffer_size - 1 - i);
    p->nfree = buffer_size;
    return p;
}

int64_t bf_cropped(const Packer *p) { return p->cropped; }
int64_t bf_rows(const Packer *p) { return p->rows; }
int64_t bf_parts(const Packer *p) { return p->parts; }

static inline int heap_less(const Packer *p, int64_t a, int64_t b) {
    return p->heap_len[a] < p->heap_len[b]
        || (p->heap_len[a] == p->heap_len[b] && p->heap_arrival[a] < p->heap_arrival[b]);
}

static inline void heap_swap(Packer *p, int64_t a, int64_t b) {
    int64_t l = p->heap_len[a], r = p->heap_arrival[a];
    int32_t d = p->heap_doc[a];
    p->heap_len[a] = p->heap_len[b]; p->heap_arrival[a] = p->heap_arrival[b];
    p->heap_doc[a] = p->heap_doc[b];
    p->heap_len[b] = l; p->heap_arrival[b] = r; p->heap_doc[b] = d;
}

static void heap_push(Packer *p, int64_t len, int32_t doc) {
    int64_t i = p->nheap++;
    p->heap_len[i] = len; p->heap_arrival[i] = p->arrival; p->heap_doc[i] = doc;
    while (i > 0 && heap_less(p, i, (i - 1) / 2)) {
        heap_swap(p, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static void heap_pop(Packer *p) {
    int64_t i = 0, n = --p->nheap;
    heap_swap(p, 0, n);
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && heap_less(p, l, m)) m = l;
        if (r < n && heap_less(p, r, m)) m = r;
        if (m == i) return;
        heap_swap(p, i, m);
        i = m;
    }
}

static void insert(Packer *p, int64_t len, int32_t doc) {
    if (len > p->L) {
        heap_push(p, len, doc);
    } else {
        int32_t s = p->free_slot[--p->nfree];
        p->doc[s] = doc;
        p->next[s] = -1;
        if (p->head[len] < 0) {
            p->head[len] = s;
            p->bits[len >> 6] |= 1ULL << (len & 63);
            p->summary[len >> 12] |= 1ULL << ((len >> 6) & 63);
        } else {
            p->next[p->tail[len]] = s;
        }
        p->tail[len] = s;
    }
    p->held++;
    p->arrival++;
}

/* Removes the earliest document of length len (<= L) and returns its id. */
static int32_t take_head(Packer *p, int64_t len) {
    int32_t s = p->head[len];
    p->head[len] = p->next[s];
    if (p->head[len] < 0) {
        p->bits[len >> 6] &= ~(1ULL << (len & 63));
        if (!p->bits[len >> 6]) p->summary[len >> 12] &= ~(1ULL << ((len >> 6) & 63));
    }
    p->free_slot[p->nfree++] = s;
    p->held--;
    return p->doc[s];
}

/* The longest length <= r present (r >= 1), or 0. */
static int64_t longest_at_most(const Packer *p, int64_t r) {
    int64_t w = r >> 6;
    uint64_t m = p->bits[w] & ((2ULL << (r & 63)) - 1);
    if (m) return (w << 6) + 63 - __builtin_clzll(m);
    if (w == 0) return 0;
    int64_t s = w - 1;  /* the highest nonzero word below w, through the summary */
    for (int64_t sw = s >> 6; sw >= 0; sw--) {
        uint64_t sm = p->summary[sw];
        if (sw == s >> 6) sm &= (2ULL << (s & 63)) - 1;
        if (sm) {
            int64_t word = (sw << 6) + 63 - __builtin_clzll(sm);
            return (word << 6) + 63 - __builtin_clzll(p->bits[word]);
        }
    }
    return 0;
}

/* The shortest length <= L present, or 0. */
static int64_t shortest(const Packer *p) {
    for (int64_t sw = 0; sw < p->nsummary; sw++) {
        if (p->summary[sw]) {
            int64_t word = (sw << 6) + __builtin_ctzll(p->summary[sw]);
            return (word << 6) + __builtin_ctzll(p->bits[word]);
        }
    }
    return 0;
}

/* Packs from the stream docs[*consumed:n_docs] (ids into lengths); final: the stream ends
 * there. Writes (document, tokens) pairs to out_parts (capacity part_capacity pairs) and row
 * ends to row_ptr (row_ptr[0] = 0 is the caller's; capacity row_capacity + 1 entries), whose
 * entries are int64 if row_ptr_64, else int32: WIDEN then asks for int64 entries before the
 * part count passes int32_limit (2**31 - 1; smaller in tests). */
int bf_pack(Packer *p, const int32_t *docs, int64_t n_docs, int64_t *consumed, int final,
            const int32_t *lengths, int64_t max_rows, int32_t *out_parts,
            int64_t part_capacity, void *row_ptr, int row_ptr_64, int64_t row_capacity,
            int64_t int32_limit) {
    int64_t in = *consumed;
    int rc = MAX_ROWS;
    while (p->rows < max_rows) {
        if (p->rows >= row_capacity) { rc = OUTPUT_FULL; break; }
        while (p->held < p->B) {  /* refill before every pick */
            if (in == n_docs) break;
            /* lengths[] is read in stream (random) order: fetch a few documents ahead */
            if (in + 16 < n_docs) __builtin_prefetch(&lengths[docs[in + 16]]);
            int32_t d = docs[in++];
            int64_t n = lengths[d];
            if (n > 0) insert(p, n, d);
        }
        if (p->held < p->B && in == n_docs && !final) { rc = NEED_INPUT; break; }
        if (p->held == 0) {  /* the stream is drained: a partial row is dropped */
            p->parts = p->row_start;
            p->pos = 0;
            rc = DONE;
            break;
        }
        if (p->parts >= part_capacity) { rc = OUTPUT_FULL; break; }
        if (!row_ptr_64 && p->parts >= int32_limit) { rc = WIDEN; break; }
        int64_t r = p->L - p->pos, n = longest_at_most(p, r), take;
        int32_t d;
        if (n) {  /* the longest document that fits, the earliest of that length */
            d = take_head(p, n);
            take = n;
        } else {  /* nothing fits: crop the shortest (the earliest of that length) */
            n = shortest(p);
            if (n) {
                d = take_head(p, n);
            } else {
                n = p->heap_len[0];
                d = p->heap_doc[0];
                heap_pop(p);
                p->held--;
            }
            take = r;
            p->cropped += n - r;
        }
        out_parts[2 * p->parts] = d;
        out_parts[2 * p->parts + 1] = (int32_t)take;
        p->parts++;
        p->pos += take;
        if (p->pos == p->L) {
            if (row_ptr_64) ((int64_t *)row_ptr)[++p->rows] = p->parts;
            else ((int32_t *)row_ptr)[++p->rows] = (int32_t)p->parts;
            p->row_start = p->parts;
            p->pos = 0;
        }
    }
    *consumed = in;
    return rc;
}
