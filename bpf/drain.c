// SPDX-License-Identifier: Apache-2.0
/* libksdrain: read a BPF ring buffer from Python in one C call per batch, not one per event.
 *
 * Readers over the same mapping (single consumer only):
 *   ks_ring_drain          copies records out as [u32 len][len bytes], back to back (the TCP
 *                          probe, and L7Probe.poll, decode those in Python);
 *   ks_ring_group          groups the l7 probe's records by connection and msgpack-encodes
 *                          them straight from the ring into one call's output (RingReader's
 *                          group_into);
 *   ks_ring_group_batches  the same, into each connection's Kafka message, held across calls
 *                          until Python flushes it (L7Probe.drain_into): the payload is copied
 *                          once into the message, once out of it into Python.
 * Each advances the consumer position only past records it handed over, so a full output
 * buffer never loses one: the rest waits in the ring for the next call.
 */
#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/types.h>
#include "l7.h"

#define RINGBUF_BUSY_BIT    (1U << 31)
#define RINGBUF_DISCARD_BIT (1U << 30)
#define RINGBUF_HDR_SZ      8

#define KS_SLOTS       8192		/* open-addressing table: conn_id -> open group */
#define KS_SLOT_KEYS   (KS_SLOTS / 2)	/* connections per call: the table stays half empty */
#define KS_BATCH_RECS  65536		/* records per ks_ring_group call */
#define KS_HEAD_LEN    offsetof(struct l7_event, payload)

struct ks_ring {
	unsigned long *consumer_pos;	/* page 0: writable by us */
	unsigned long *producer_pos;	/* page 1: read-only */
	uint8_t *data;			/* after producer page, mapped twice for wrap-around */
	unsigned long mask;
	size_t page_size;
	size_t data_size;
	/* ks_ring_group's working state, allocated on its first call. */
	const struct l7_event **rec;	/* the records of this call, in ring order */
	uint32_t *rec_group;		/* ... and the group each one joins */
	uint64_t slot_key[KS_SLOTS];
	int32_t slot_group[KS_SLOTS];
	uint32_t slot_gen[KS_SLOTS];	/* a slot is in use if it carries this call's gen */
	uint32_t gen;
};

/* Maps the ring buffer map_fd of data_size bytes (its max_entries). NULL + errno on error. */
struct ks_ring *ks_ring_open(int map_fd, size_t data_size)
{
	struct ks_ring *r = calloc(1, sizeof(*r));
	void *p;

	if (!r)
		return NULL;
	r->page_size = (size_t)sysconf(_SC_PAGESIZE);
	r->data_size = data_size;
	r->mask = data_size - 1;
	p = mmap(NULL, r->page_size, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
	if (p == MAP_FAILED)
		goto err;
	r->consumer_pos = p;
	p = mmap(NULL, r->page_size + 2 * data_size, PROT_READ, MAP_SHARED, map_fd,
		 (off_t)r->page_size);
	if (p == MAP_FAILED) {
		int saved = errno;

		munmap(r->consumer_pos, r->page_size);
		errno = saved;
		goto err;
	}
	r->producer_pos = p;
	r->data = (uint8_t *)p + r->page_size;
	return r;
err:
	free(r);
	return NULL;
}

void ks_ring_close(struct ks_ring *r)
{
	if (!r)
		return;
	munmap(r->producer_pos, r->page_size + 2 * r->data_size);
	munmap(r->consumer_pos, r->page_size);
	free(r->rec);
	free(r->rec_group);
	free(r);
}

/* Copies committed records into out until it is full or the ring is empty.
 * Returns bytes written to out; *nrec receives the record count. */
size_t ks_ring_drain(struct ks_ring *r, uint8_t *out, size_t out_len, uint64_t *nrec)
{
	unsigned long cons = __atomic_load_n(r->consumer_pos, __ATOMIC_ACQUIRE);
	unsigned long prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);
	size_t used = 0;
	uint64_t n = 0;

	while (cons < prod) {
		uint32_t *hdr = (uint32_t *)(r->data + (cons & r->mask));
		uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
		uint32_t body = len & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT);

		if (len & RINGBUF_BUSY_BIT)
			break;	/* reserved, not committed yet: stop here, keep order */
		if (!(len & RINGBUF_DISCARD_BIT)) {
			if (used + 4 + body > out_len)
				break;
			memcpy(out + used, &body, 4);
			memcpy(out + used + 4, (uint8_t *)hdr + RINGBUF_HDR_SZ, body);
			used += 4 + body;
			n++;
		}
		cons += (body + RINGBUF_HDR_SZ + 7) & ~7UL;
		/* Publish progress per record so the producer regains space early. */
		__atomic_store_n(r->consumer_pos, cons, __ATOMIC_RELEASE);
		if (cons >= prod)
			prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);
	}
	*nrec = n;
	return used;
}

/* Bytes committed or reserved but not yet consumed. */
size_t ks_ring_pending(struct ks_ring *r)
{
	return __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE) -
	       __atomic_load_n(r->consumer_pos, __ATOMIC_ACQUIRE);
}

/* ---- grouping: l7 records -> per-connection msgpack event arrays -------------------------
 *
 * The probe's hot path in Python was one unpack, one slice and one list per event. Here the
 * records are grouped by connection and each event is encoded as the msgpack array raw.v1
 * carries, [kind, unix ts_ns, size, bin payload], so Python only touches each connection
 * once. A connection's events stay in order; a group is split once it reaches max_events or
 * max_bytes so no Kafka message outgrows the broker.
 */
struct ks_group {
	uint64_t conn_id;
	uint32_t nevents;
	uint32_t data_off;	/* this group's encoded events in `data` */
	uint32_t data_len;
	uint32_t flags;		/* l7_event.flags of the group's events, or-ed (TLS) */
	/* Copies of the fixed part of two records (the ring space is handed back to the kernel
	 * before Python reads them): the first (connection identity) and the latest (TCP health
	 * as of the batch's end). */
	uint8_t first[KS_HEAD_LEN];
	uint8_t last[KS_HEAD_LEN];
};

/* For tests/probe/test_layout.py: the ctypes mirror of struct ks_group is checked against it. */
const uint32_t ks_group_layout[] = {
	sizeof(struct ks_group),
	offsetof(struct ks_group, conn_id),
	offsetof(struct ks_group, nevents),
	offsetof(struct ks_group, data_off),
	offsetof(struct ks_group, data_len),
	offsetof(struct ks_group, flags),
	offsetof(struct ks_group, first),
	offsetof(struct ks_group, last),
};

static size_t encoded_len(uint32_t cap)
{
	/* fixarray, fixint kind, uint64 ts, int64 size, bin header + bytes */
	return 1 + 1 + 9 + 9 + (cap < 256 ? 2 : cap < 65536 ? 3 : 5) + cap;
}

static uint8_t *put_be64(uint8_t *p, uint8_t tag, uint64_t v)
{
	v = htobe64(v);		/* msgpack is big-endian; one store, not eight */
	*p = tag;
	memcpy(p + 1, &v, 8);
	return p + 9;
}

static uint8_t *encode_event(uint8_t *p, const struct l7_event *ev, uint32_t cap,
			     int64_t offset_ns)
{
	*p++ = 0x94;			/* fixarray of 4 */
	*p++ = ev->kind & 0x7f;		/* positive fixint */
	p = put_be64(p, 0xcf, ev->ts_ns + (uint64_t)offset_ns);
	p = put_be64(p, 0xd3, (uint64_t)ev->size);
	if (cap < 256) {
		*p++ = 0xc4;
		*p++ = (uint8_t)cap;
	} else if (cap < 65536) {
		*p++ = 0xc5;
		*p++ = (uint8_t)(cap >> 8);
		*p++ = (uint8_t)cap;
	} else {
		*p++ = 0xc6;
		for (int i = 3; i >= 0; i--)
			*p++ = (uint8_t)(cap >> (8 * i));
	}
	memcpy(p, ev->payload, cap);
	return p + cap;
}

/* Payload bytes of a record: cap_len, but never past the record (it is the kernel's word). */
static uint32_t record_cap(const struct l7_event *ev, uint32_t body)
{
	uint32_t room = body - KS_HEAD_LEN;

	return ev->cap_len < room ? ev->cap_len : room;
}

/* Groups and encodes the committed records at the head of the ring, then hands their space
 * back to the kernel. Stops early (the rest stays in the ring, in order) at a record still
 * being written, or when groups[], data[] or this call's record or connection budget is full.
 * Returns the number of groups written (0: nothing to do); *nrec receives the events encoded.
 * -1 with errno: ENOMEM, or ENOBUFS if data[] cannot hold even one record. */
long ks_ring_group(struct ks_ring *r, int64_t offset_ns, uint32_t max_events, uint32_t max_bytes,
		   struct ks_group *groups, size_t groups_cap, uint8_t *data, size_t data_cap,
		   uint64_t *nrec)
{
	unsigned long cons = __atomic_load_n(r->consumer_pos, __ATOMIC_ACQUIRE);
	unsigned long prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);
	unsigned long pos = cons;
	size_t ngroups = 0, nkeys = 0, data_used = 0, n = 0, i;
	int full = 0;
	uint32_t gen;

	*nrec = 0;
	if (!r->rec) {
		r->rec = malloc(KS_BATCH_RECS * sizeof(*r->rec));
		r->rec_group = malloc(KS_BATCH_RECS * sizeof(*r->rec_group));
		if (!r->rec || !r->rec_group) {
			free(r->rec);
			free(r->rec_group);
			r->rec = NULL;
			r->rec_group = NULL;
			errno = ENOMEM;
			return -1;
		}
	}
	gen = ++r->gen;
	if (gen == 0) {		/* wrapped: forget every slot once */
		memset(r->slot_gen, 0, sizeof(r->slot_gen));
		gen = r->gen = 1;
	}

	/* Pass 1: assign each record to a group and size the groups. The ring is mapped twice
	 * in a row, so a record that wraps around its end is still contiguous. */
	while (pos < prod && n < KS_BATCH_RECS) {
		const uint8_t *hdr = r->data + (pos & r->mask);
		uint32_t len = __atomic_load_n((const uint32_t *)hdr, __ATOMIC_ACQUIRE);
		uint32_t body = len & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT);
		unsigned long next = pos + ((body + RINGBUF_HDR_SZ + 7) & ~7UL);
		const struct l7_event *ev = (const void *)(hdr + RINGBUF_HDR_SZ);
		struct ks_group *g = NULL;
		size_t h, elen;
		int known, split;

		if (len & RINGBUF_BUSY_BIT)
			break;	/* reserved, not committed yet: stop here, keep order */
		if ((len & RINGBUF_DISCARD_BIT) || body < KS_HEAD_LEN) {
			pos = next;	/* discarded by the program (or not an event): skip it */
			continue;
		}
		elen = encoded_len(record_cap(ev, body));
		h = (size_t)(ev->conn_id * 0x9E3779B97F4A7C15ULL) >> 51; /* 13 bits */
		while (r->slot_gen[h] == gen && r->slot_key[h] != ev->conn_id)
			h = (h + 1) & (KS_SLOTS - 1);
		known = r->slot_gen[h] == gen;
		if (known)
			g = &groups[r->slot_group[h]];
		split = !g || g->nevents >= max_events || g->data_len + elen > max_bytes;
		/* Out of room for this record: leave it (and everything after it) in the ring. */
		if ((split && ngroups == groups_cap) || (!known && nkeys == KS_SLOT_KEYS) ||
		    data_used + elen > data_cap) {
			full = 1;
			break;
		}
		if (split) {
			g = &groups[ngroups];
			g->conn_id = ev->conn_id;
			g->nevents = 0;
			g->data_len = 0;
			g->flags = 0;
			memcpy(g->first, ev, KS_HEAD_LEN);
			if (!known) {
				r->slot_gen[h] = gen;
				r->slot_key[h] = ev->conn_id;
				nkeys++;
			}
			r->slot_group[h] = (int32_t)ngroups++;
		}
		g->nevents++;
		g->flags |= ev->flags;
		g->data_len += (uint32_t)elen;
		g->data_off = (uint32_t)n;	/* until pass 2: index of the group's latest record */
		data_used += elen;
		r->rec[n] = ev;
		r->rec_group[n++] = (uint32_t)(g - groups);
		pos = next;
		if (pos >= prod)
			prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);
	}
	if (full && n == 0) {
		errno = ENOBUFS;	/* a committed record fits in no output at all */
		return -1;
	}

	/* Lay the groups out back to back; keep the latest record's header. */
	for (data_used = 0, i = 0; i < ngroups; i++) {
		memcpy(groups[i].last, r->rec[groups[i].data_off], KS_HEAD_LEN);
		groups[i].data_off = (uint32_t)data_used;
		data_used += groups[i].data_len;
		groups[i].data_len = 0;
	}
	/* Pass 2: encode each event at the end of its group, payload straight from the ring. */
	for (i = 0; i < n; i++) {
		const struct l7_event *ev = r->rec[i];
		struct ks_group *g = &groups[r->rec_group[i]];
		uint32_t body = *(const uint32_t *)((const uint8_t *)ev - RINGBUF_HDR_SZ) &
				~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT);
		uint8_t *end = encode_event(data + g->data_off + g->data_len, ev,
					    record_cap(ev, body), offset_ns);

		g->data_len = (uint32_t)(end - (data + g->data_off));
	}
	/* Everything up to pos is encoded (or was discarded): the kernel may reuse it now. */
	if (pos != cons)
		__atomic_store_n(r->consumer_pos, pos, __ATOMIC_RELEASE);
	*nrec = n;
	return (long)ngroups;
}

/* ---- batching: each connection's Kafka message built in one buffer, across calls ---------
 *
 * With ks_ring_group every payload was copied three times after the ring: into that call's
 * data[], out of it into one bytes per run (data[] is reused), and into the message by the
 * join at flush. ks_ring_group_batches instead encodes each event into the buffer of its
 * connection's open batch, which outlives the call: it is Python's until Publisher.flush
 * turns it into a message (ks_batch_message writes the message head into the room left in
 * front of the events, so the value is one piece of memory, copied once into a bytes) and
 * releases it. A batch is sealed, and the connection's next one opened, where the Python
 * fallback (decode_grouped) seals it: event by event, whatever the drain calls' boundaries.
 *
 * Python reads batches in ks_batches_info()'s table, which never moves (no call per read),
 * and hands released batches to the next ks_ring_group_batches call (no call per release).
 */
#define KS_HEADROOM    1024		/* room for the message head (the raw.v1 map up to events) */
#define KS_BUF_MIN     (16 << 10)	/* first capacity of a batch's buffer; then it doubles */
#define KS_BATCHES_MAX (1 << 18)	/* batches at once, open or sealed and not released */
#define KS_OPEN_MAX    (1 << 17)	/* open batches (connections) at once */
#define KS_CONN_SLOTS  (2 * KS_OPEN_MAX)	/* conn_id -> open batch: at most half full */
#define KS_HELD_MAX    ((size_t)256 << 20)	/* encoded bytes held: past it records wait */
#define KS_IDLE_MAX    ((size_t)64 << 20)	/* buffer capacity kept in released batches */
#define KS_NONE        UINT32_MAX

/* What Python reads of a batch (tests/probe/test_layout.py checks the ctypes mirror). */
struct ks_batch_info {
	uint64_t conn_id;
	uint32_t nevents;
	uint32_t len;		/* bytes of its encoded events */
	uint32_t flags;		/* l7_event.flags of its events, or-ed (TLS) */
	uint32_t srtt_us;	/* of its latest event with srtt_us != 0 (TCP health at its end) */
	uint32_t retrans;	/* ... from the same event */
	uint32_t tls_first;	/* its first TLS event came before any srtt_us: raw.v1 meta key order */
	uint64_t data;		/* address of its events; the message head goes in the ... */
	uint32_t room;		/* ... bytes right before them (ks_batch_message if it is longer) */
	uint32_t _pad;
	uint8_t first[KS_HEAD_LEN];	/* its first record's header: the connection's identity */
};

const uint32_t ks_batch_info_layout[] = {
	sizeof(struct ks_batch_info),
	offsetof(struct ks_batch_info, conn_id),
	offsetof(struct ks_batch_info, nevents),
	offsetof(struct ks_batch_info, len),
	offsetof(struct ks_batch_info, flags),
	offsetof(struct ks_batch_info, srtt_us),
	offsetof(struct ks_batch_info, retrans),
	offsetof(struct ks_batch_info, tls_first),
	offsetof(struct ks_batch_info, data),
	offsetof(struct ks_batch_info, room),
	offsetof(struct ks_batch_info, _pad),
	offsetof(struct ks_batch_info, first),
};
const uint32_t ks_batches_max = KS_BATCHES_MAX;	/* entries of ks_batches_info()'s table */

struct ks_batch {
	uint8_t *buf;		/* kept when the batch is released: the next one reuses it warm */
	size_t cap;
	uint32_t start;		/* the events begin at buf + start, the head goes right before */
	uint32_t next_free;	/* while released: the next released batch */
	int live;		/* handed to Python and not released yet */
};

struct ks_batches {
	struct ks_batch_info *info;	/* KS_BATCHES_MAX of each, touched as they are used */
	struct ks_batch *batch;
	uint32_t nbatch;		/* batches made so far */
	uint32_t free_head;		/* released batches, latest first (its buffer is warmest) */
	uint32_t nopen;
	size_t held;			/* encoded bytes in live batches */
	size_t idle;			/* buffer capacity in released ones */
	uint64_t slot_key[KS_CONN_SLOTS];	/* linear probing; deleted by backward shift */
	uint32_t slot_batch[KS_CONN_SLOTS];	/* open batch + 1; 0: empty */
};

struct ks_batches *ks_batches_new(void)
{
	/* ~45 MiB of address space, mostly never touched: calloc hands out zero pages, faulted
	 * in as batches and connection slots are used. */
	struct ks_batches *b = calloc(1, sizeof(*b));

	if (!b)
		return NULL;
	b->info = calloc(KS_BATCHES_MAX, sizeof(*b->info));
	b->batch = calloc(KS_BATCHES_MAX, sizeof(*b->batch));
	if (!b->info || !b->batch) {
		free(b->info);
		free(b->batch);
		free(b);
		return NULL;
	}
	b->free_head = KS_NONE;
	return b;
}

void ks_batches_free(struct ks_batches *b)
{
	if (!b)
		return;
	for (uint32_t i = 0; i < b->nbatch; i++)
		free(b->batch[i].buf);
	free(b->batch);
	free(b->info);
	free(b);
}

/* The ks_batches_max batches' struct ks_batch_info, at an address that never changes. */
const struct ks_batch_info *ks_batches_info(const struct ks_batches *b)
{
	return b->info;
}

static size_t conn_home(uint64_t conn_id)
{
	return (size_t)((conn_id * 0x9E3779B97F4A7C15ULL) >> 46);	/* 18 bits: KS_CONN_SLOTS */
}

/* The slot holding conn_id, or the empty slot where it would go. */
static size_t conn_slot(const struct ks_batches *b, uint64_t conn_id)
{
	size_t h = conn_home(conn_id);

	while (b->slot_batch[h] && b->slot_key[h] != conn_id)
		h = (h + 1) & (KS_CONN_SLOTS - 1);
	return h;
}

/* Empty slot h and move later entries of its probe run back, so lookups never stop short at
 * the hole (Knuth 6.4, algorithm R): no tombstones to pile up over a long run. */
static void conn_remove(struct ks_batches *b, size_t h)
{
	size_t j = h;

	for (;;) {
		size_t home;
		int between;

		j = (j + 1) & (KS_CONN_SLOTS - 1);
		if (!b->slot_batch[j])
			break;
		home = conn_home(b->slot_key[j]);
		between = h <= j ? (h < home && home <= j) : (h < home || home <= j);
		if (!between) {	/* the entry at j may sit at h: its home is not within (h, j] */
			b->slot_key[h] = b->slot_key[j];
			b->slot_batch[h] = b->slot_batch[j];
			h = j;
		}
	}
	b->slot_batch[h] = 0;
}

/* Room for `more` bytes after the `len` bytes of events in g; 0 with errno ENOMEM if none. */
static int batch_reserve(struct ks_batch *g, uint32_t len, size_t more)
{
	size_t need = g->start + len + more, cap = g->cap ? g->cap : KS_BUF_MIN;
	uint8_t *buf;

	if (need <= g->cap)
		return 1;
	while (cap < need)
		cap *= 2;
	buf = realloc(g->buf, cap);
	if (!buf) {
		errno = ENOMEM;
		return 0;
	}
	g->buf = buf;
	g->cap = cap;
	return 1;
}

/* A batch for ev's connection whose buffer takes elen bytes of events, released ones first.
 * KS_NONE if there is none: errno ENOMEM, or 0 when all KS_BATCHES_MAX are live. */
static uint32_t batch_new(struct ks_batches *b, const struct l7_event *ev, size_t elen)
{
	uint32_t id = b->free_head;
	struct ks_batch_info *info;

	if (id == KS_NONE) {
		if (b->nbatch == KS_BATCHES_MAX) {
			errno = 0;
			return KS_NONE;
		}
		id = b->nbatch;
		b->batch[id].start = KS_HEADROOM;
		if (!batch_reserve(&b->batch[id], 0, elen))
			return KS_NONE;
		b->nbatch++;
	} else {
		if (!batch_reserve(&b->batch[id], 0, elen))
			return KS_NONE;
		b->free_head = b->batch[id].next_free;
		b->idle -= b->batch[id].cap;
	}
	info = &b->info[id];
	memset(info, 0, sizeof(*info));
	info->data = (uintptr_t)(b->batch[id].buf + b->batch[id].start);
	info->room = b->batch[id].start;
	info->conn_id = ev->conn_id;
	memcpy(info->first, ev, KS_HEAD_LEN);
	b->batch[id].live = 1;
	return id;
}

/* Python is done with batch id (its message is made, or it was dropped): if it is still its
 * connection's open batch, the connection's next event opens a new one. Its buffer is kept
 * for reuse, up to KS_IDLE_MAX of them. 0, or -1 if id is not a live batch. */
static int batch_release(struct ks_batches *b, uint32_t id)
{
	struct ks_batch *g;
	size_t h;

	if (id >= b->nbatch || !b->batch[id].live)
		return -1;
	g = &b->batch[id];
	h = conn_slot(b, b->info[id].conn_id);
	if (b->slot_batch[h] == id + 1) {
		conn_remove(b, h);
		b->nopen--;
	}
	b->held -= b->info[id].len;
	g->live = 0;
	if (b->idle + g->cap > KS_IDLE_MAX) {
		free(g->buf);
		g->buf = NULL;
		g->cap = 0;
	}
	b->idle += g->cap;
	g->next_free = b->free_head;
	b->free_head = id;
	return 0;
}

/* Releases the nreleased batches in released[] (Python is done with them), then groups and
 * encodes the committed records at the head of the ring into the open batch of each one's
 * connection, opening a batch where the connection has none or where its open one reached
 * max_events or max_bytes (which seals it), and hands their space back to the kernel.
 * Stops early (the rest stays in the ring, in order) at a record still being written, after
 * max_encode bytes, when opened[] is full, or when the live batches hold KS_HELD_MAX bytes,
 * KS_OPEN_MAX connections or KS_BATCHES_MAX batches (until Python releases some).
 * Returns the number of batches opened, their ids in opened[] in the order of their first
 * events; *nrec receives the events encoded (0: nothing to do, or nothing can be taken now).
 * -1 with errno: EINVAL if released[] names a batch that is not live (the others are
 * released, no record is taken), ENOMEM, or ENOBUFS if max_encode or opened[] cannot take
 * even one record. */
long ks_ring_group_batches(struct ks_ring *r, struct ks_batches *b, const uint32_t *released,
			   size_t nreleased, int64_t offset_ns, uint32_t max_events,
			   uint32_t max_bytes, size_t max_encode, uint32_t *opened,
			   size_t opened_cap, uint64_t *nrec)
{
	unsigned long cons, prod, pos;
	size_t nopened = 0, encoded = 0, i;
	uint64_t n = 0;
	int err = 0;

	*nrec = 0;
	for (i = 0; i < nreleased; i++)
		if (batch_release(b, released[i]) < 0)
			err = EINVAL;
	if (err) {
		errno = err;
		return -1;
	}
	cons = __atomic_load_n(r->consumer_pos, __ATOMIC_ACQUIRE);
	prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);
	pos = cons;
	while (pos < prod) {
		const uint8_t *hdr = r->data + (pos & r->mask);
		uint32_t len = __atomic_load_n((const uint32_t *)hdr, __ATOMIC_ACQUIRE);
		uint32_t body = len & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT);
		unsigned long next = pos + ((body + RINGBUF_HDR_SZ + 7) & ~7UL);
		const struct l7_event *ev = (const void *)(hdr + RINGBUF_HDR_SZ);
		struct ks_batch_info *info = NULL;
		uint32_t cap, id = KS_NONE;
		size_t elen, h;

		if (len & RINGBUF_BUSY_BIT)
			break;	/* reserved, not committed yet: stop here, keep order */
		if ((len & RINGBUF_DISCARD_BIT) || body < KS_HEAD_LEN) {
			pos = next;	/* discarded by the program (or not an event): skip it */
			continue;
		}
		cap = record_cap(ev, body);
		elen = encoded_len(cap);
		if (encoded + elen > max_encode) {
			err = ENOBUFS;
			break;
		}
		if (b->held + elen > KS_HELD_MAX)
			break;	/* not an error: the records wait for Python to release batches */
		h = conn_slot(b, ev->conn_id);
		if (b->slot_batch[h]) {
			id = b->slot_batch[h] - 1;
			info = &b->info[id];
		}
		if (!info || info->nevents >= max_events || info->len + elen > max_bytes) {
			uint32_t fresh;

			if (nopened == opened_cap) {
				err = ENOBUFS;
				break;
			}
			if (!info && b->nopen == KS_OPEN_MAX)
				break;	/* as for KS_HELD_MAX */
			fresh = batch_new(b, ev, elen);
			if (fresh == KS_NONE) {
				err = errno;	/* 0: all batches live, as for KS_HELD_MAX */
				break;
			}
			if (!info) {
				b->slot_key[h] = ev->conn_id;
				b->nopen++;
			}
			b->slot_batch[h] = fresh + 1;	/* the connection's previous batch, sealed */
			opened[nopened++] = fresh;
			id = fresh;
			info = &b->info[id];
		} else if (!batch_reserve(&b->batch[id], info->len, elen)) {
			err = ENOMEM;
			break;
		} else {	/* the buffer may have moved */
			info->data = (uintptr_t)(b->batch[id].buf + b->batch[id].start);
		}
		encode_event(b->batch[id].buf + b->batch[id].start + info->len, ev, cap, offset_ns);
		info->len += (uint32_t)elen;
		info->nevents++;
		/* raw.v1's meta gets "tls" and "srtt_us" in the order they first appear */
		if ((ev->flags & L7_FLAG_TLS) && !(info->flags & L7_FLAG_TLS))
			info->tls_first = info->srtt_us == 0;
		info->flags |= ev->flags;
		if (ev->srtt_us) {
			info->srtt_us = ev->srtt_us;
			info->retrans = ev->retrans;
		}
		encoded += elen;
		b->held += elen;
		n++;
		pos = next;
		if (pos >= prod)
			prod = __atomic_load_n(r->producer_pos, __ATOMIC_ACQUIRE);
	}
	/* Everything up to pos is encoded (or was discarded): the kernel may reuse it now. */
	if (pos != cons)
		__atomic_store_n(r->consumer_pos, pos, __ATOMIC_RELEASE);
	*nrec = n;
	if (!n && err) {
		errno = err;
		return -1;
	}
	return (long)nopened;
}

/* Puts head (head_len bytes) right before batch id's events and returns where it begins:
 * the message is the head_len + events bytes from there (*len). Head and events stay there
 * until the batch's next ks_batch_message or its release. Python writes a head that fits in
 * the batch's room itself; this moves the events up for a longer one. NULL + errno (EINVAL,
 * ENOMEM) on error. */
const uint8_t *ks_batch_message(struct ks_batches *b, uint32_t id, const uint8_t *head,
				size_t head_len, size_t *len)
{
	struct ks_batch *g;
	uint32_t events;

	if (id >= b->nbatch || !b->batch[id].live) {
		errno = EINVAL;
		return NULL;
	}
	g = &b->batch[id];
	events = b->info[id].len;
	if (head_len > g->start) {
		/* A head longer than the room in front (big annotations): move the events up,
		 * once; the buffer keeps the larger room for the batches that reuse it. */
		size_t start = head_len + KS_HEADROOM / 4;

		if (start > UINT32_MAX - (size_t)events) {
			errno = EINVAL;
			return NULL;
		}
		if (!batch_reserve(g, events, start - g->start))
			return NULL;
		memmove(g->buf + start, g->buf + g->start, events);
		g->start = (uint32_t)start;
		b->info[id].data = (uintptr_t)(g->buf + g->start);
		b->info[id].room = g->start;
	}
	memcpy(g->buf + g->start - head_len, head, head_len);
	*len = head_len + events;
	return g->buf + g->start - head_len;
}
