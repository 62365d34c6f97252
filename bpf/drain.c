// SPDX-License-Identifier: Apache-2.0
/* libksdrain: read a BPF ring buffer from Python in one C call per batch, not one per event.
 *
 * Two readers over the same mapping (single consumer only):
 *   ks_ring_drain  copies records out as [u32 len][len bytes], back to back (the TCP probe, and
 *                  L7Probe.poll, decode those in Python);
 *   ks_ring_group  groups the l7 probe's records by connection and msgpack-encodes them
 *                  straight from the ring: the payload is copied once, ring -> encoded batch.
 * Either advances the consumer position only past records it handed over, so a full output
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
