// SPDX-License-Identifier: Apache-2.0
/* libksdrain: batch-drain a BPF ring buffer into a caller's buffer.
 *
 * Python calls ks_ring_drain() once per poll instead of once per event (a ctypes callback per
 * event tops out near 400k events/s here). Records are copied as [u32 len][len bytes], back to
 * back; the consumer position only advances past records that were copied, so a full output
 * buffer never loses one. Single consumer only.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define RINGBUF_BUSY_BIT    (1U << 31)
#define RINGBUF_DISCARD_BIT (1U << 30)
#define RINGBUF_HDR_SZ      8

struct ks_ring {
	unsigned long *consumer_pos;	/* page 0: writable by us */
	unsigned long *producer_pos;	/* page 1: read-only */
	uint8_t *data;			/* after producer page, mapped twice for wrap-around */
	unsigned long mask;
	size_t page_size;
	size_t data_size;
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

/* ---- grouping: records → per-connection msgpack event arrays ----------------------------
 *
 * The probe's hot path in Python was one unpack, one slice and one list per event. Here the
 * drained records (as ks_ring_drain wrote them) are grouped by connection and each event is
 * encoded as the msgpack array raw.v1 carries, [kind, unix ts_ns, size, bin payload], so
 * Python only touches each connection once. A connection's events stay in order; a group is
 * split once it reaches max_events or max_bytes so no Kafka message outgrows the broker.
 */
#include <linux/types.h>
#include "l7.h"

struct ks_group {
	uint64_t conn_id;
	uint32_t first;		/* offset in `in` of the group's first record ([u32 len] prefix) */
	uint32_t nevents;
	uint32_t data_off;	/* this group's encoded events in `data` */
	uint32_t data_len;
	uint32_t flags;		/* l7_event.flags of the group's events, or-ed (TLS) */
	uint32_t last;		/* offset in `in` of the group's latest record (TCP health) */
};

#define KS_SLOTS 8192		/* open-addressing table: conn_id -> open group */

static size_t encoded_len(uint32_t cap)
{
	/* fixarray, fixint kind, uint64 ts, int64 size, bin header + bytes */
	return 1 + 1 + 9 + 9 + (cap < 256 ? 2 : cap < 65536 ? 3 : 5) + cap;
}

static uint8_t *put_be64(uint8_t *p, uint8_t tag, uint64_t v)
{
	*p++ = tag;
	for (int i = 7; i >= 0; i--)
		*p++ = (uint8_t)(v >> (8 * i));
	return p;
}

static uint8_t *encode_event(uint8_t *p, const struct l7_event *ev, int64_t offset_ns)
{
	uint32_t cap = ev->cap_len;

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

/* Returns the number of groups written to groups[], or -1 if data or groups is too small
 * (the caller retries with bigger buffers). */
long ks_group(const uint8_t *in, size_t used, int64_t offset_ns, uint32_t max_events,
	      uint32_t max_bytes, struct ks_group *groups, size_t groups_cap, uint8_t *data,
	      size_t data_cap)
{
	static int32_t slot_group[KS_SLOTS];
	static uint64_t slot_key[KS_SLOTS];
	size_t ngroups = 0, off, data_used = 0;
	uint32_t *rec_group;
	size_t nrec = 0, i;

	/* Pass 1: assign each record to a group and size the groups. */
	for (off = 0; off + 4 <= used; nrec++)
		off += 4 + *(const uint32_t *)(in + off);
	rec_group = malloc((nrec ? nrec : 1) * sizeof(*rec_group));
	if (!rec_group)
		return -1;
	memset(slot_group, 0xff, sizeof(slot_group));
	for (off = 0, i = 0; i < nrec; i++) {
		const struct l7_event *ev = (const void *)(in + off + 4);
		size_t h = (size_t)(ev->conn_id * 0x9E3779B97F4A7C15ULL) >> 51; /* 13 bits */
		size_t len = encoded_len(ev->cap_len);
		struct ks_group *g;

		while (slot_group[h] >= 0 && slot_key[h] != ev->conn_id)
			h = (h + 1) & (KS_SLOTS - 1);
		g = slot_group[h] >= 0 ? &groups[slot_group[h]] : NULL;
		if (!g || g->nevents >= max_events || g->data_len + len > max_bytes) {
			if (ngroups == groups_cap) {
				free(rec_group);
				return -1;
			}
			g = &groups[ngroups];
			g->conn_id = ev->conn_id;
			g->first = (uint32_t)off;
			g->nevents = 0;
			g->data_len = 0;
			g->flags = 0;
			slot_group[h] = (int32_t)ngroups++;
			slot_key[h] = ev->conn_id;
		}
		g->nevents++;
		g->flags |= ev->flags;
		g->last = (uint32_t)off;
		g->data_len += (uint32_t)len;
		rec_group[i] = (uint32_t)(g - groups);
		off += 4 + *(const uint32_t *)(in + off);
	}
	for (i = 0; i < ngroups; i++) {
		groups[i].data_off = (uint32_t)data_used;
		data_used += groups[i].data_len;
		groups[i].data_len = 0;
	}
	if (data_used > data_cap) {
		free(rec_group);
		return -1;
	}
	/* Pass 2: encode each event at the end of its group. */
	for (off = 0, i = 0; i < nrec; i++) {
		const struct l7_event *ev = (const void *)(in + off + 4);
		struct ks_group *g = &groups[rec_group[i]];
		uint8_t *end = encode_event(data + g->data_off + g->data_len, ev, offset_ns);

		g->data_len = (uint32_t)(end - (data + g->data_off));
		off += 4 + *(const uint32_t *)(in + off);
	}
	free(rec_group);
	return (long)ngroups;
}
