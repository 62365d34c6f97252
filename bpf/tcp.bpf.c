// SPDX-License-Identifier: GPL-2.0
/* tcp: per-connection TCP health, aggregated in the kernel from tracepoints (no kprobes).
 *
 * One `conns` entry per connection, keyed by its struct sock *:
 *   sock:inet_sock_set_state  SYN_SENT (active open) / SYN_RECV (passive open) create it,
 *                             ESTABLISHED names the processes, CLOSE finalises it;
 *   tcp:tcp_retransmit_skb    segments retransmitted (SYN retransmits of a connect included),
 *                             counted as the kernel counts them into the connection's
 *                             total_retrans (TCP_INFO tcpi_total_retrans): one GSO skb sent
 *                             again is as many segments as it carries (one not sent, an
 *                             error in the tracepoint's err, is not counted);
 *   tcp:tcp_send_reset, tcp:tcp_receive_reset   resets; a reset received in SYN_SENT = refused;
 *   tcp:tcp_probe             smoothed RTT (µs) into last/min/max/sum and a log2 histogram,
 *                             and the byte counters of tcp_sock, once per received segment;
 *   tcp:tcp_destroy_sock      the record goes to the ring buffer (no wakeup: the user side
 *                             polls on a timer) and the entry is deleted. Not at CLOSE itself:
 *                             an abortive close (unread data, SO_LINGER 0) sends its reset
 *                             after the state change.
 * Long-lived connections are reported by the user side iterating `conns` every few seconds.
 *
 * Processes. Only an active open runs in the process's context (connect() sets SYN_SENT), so
 * its tgid and comm are the current task's. A passive open completes in softirq context, where
 * the current task is whoever was interrupted: it is named by its listener instead, learnt when
 * the process called listen() (CLOSE -> LISTEN runs in its context) or, for listeners older
 * than the probe, from the user side's /proc scan. A connection between two processes of this
 * node learns the client from the active end's 4-tuple (`peers`), and a loopback connect
 * learns the server from `listeners`. kubesight's own connections are excluded where one of
 * these names an excluded tgid; the entry stays, flagged, so later events stop at one lookup.
 * Connections open before the probe started are adopted at their first event (role from the
 * listener table, bytes counted from then on); the user side drops those it finds among
 * kubesight's own sockets in /proc.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "tcp.h"

/* Not in vmlinux.h: these are macros in the kernel. */
#define AF_INET		2
#define AF_INET6	10

char LICENSE[] SEC("license") = "GPL";

__u64 next_conn_id = 0;

/* A process as the tables remember it. */
struct ks_tcp_proc {
	__u32 tgid;
	__u8  excluded;
	__u8  _pad[3];
	char  comm[KS_TCP_COMM_LEN];
};

struct ks_tcp_listen_key {
	__u32 netns;
	__u16 port;
	__u16 _pad;
};

/* A connection's 4-tuple as seen from one end. */
struct ks_tcp_tuple {
	__u8  laddr[KS_TCP_ADDR_LEN];
	__u8  raddr[KS_TCP_ADDR_LEN];
	__u16 lport;
	__u16 rport;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, KS_TCP_RINGBUF_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);	/* a missed destroy must not leak the entry */
	__uint(max_entries, KS_TCP_MAX_CONNECTIONS);
	__type(key, __u64);			/* struct sock * */
	__type(value, struct ks_tcp_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KS_TCP_MAX_PEERS);
	__type(key, struct ks_tcp_tuple);	/* the active end's tuple */
	__type(value, struct ks_tcp_proc);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KS_TCP_MAX_LISTENERS);
	__type(key, struct ks_tcp_listen_key);
	__type(value, struct ks_tcp_proc);
} listeners SEC(".maps");

/* kubesight's own processes, one bit per tgid: the layout of l7's excluded_tgids, whose map
 * the probe runner hands this object before load, so that l7's fork, exec and exit hooks
 * keep both. Standalone, the user side sets the bits. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KS_TCP_TGID_WORDS);
	__type(key, __u32);			/* tgid / 64 */
	__type(value, __u64);			/* bit tgid % 64 */
} excluded_tgids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KS_TCP_CNT__MAX);
	__type(key, __u32);			/* enum ks_tcp_counter */
	__type(value, __u64);
} counters SEC(".maps");

/* A fresh entry is inserted from here, then filled in place (the struct is too big for the
 * stack next to everything else). */
const struct ks_tcp_conn zero_conn = {};

/* Keeps the layout types in the object's BTF, where the user side's tests read them. */
struct ks_tcp_btf_anchor {
	enum ks_tcp_kind kind;
	enum ks_tcp_role role;
	enum ks_tcp_flag flag;
	enum ks_tcp_counter counter;
	struct ks_tcp_conn *conn;
	struct ks_tcp_proc *proc;
	struct ks_tcp_listen_key *listen_key;
	struct ks_tcp_tuple *tuple;
} ks_tcp_btf_anchor __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u64 *val = bpf_map_lookup_elem(&counters, &idx);

	if (val)
		*val += 1;	/* per-CPU slot: no atomic needed */
}

static __always_inline bool is_excluded(__u32 tgid)
{
	__u32 word = tgid / 64;
	__u64 *bits = bpf_map_lookup_elem(&excluded_tgids, &word);

	return bits && (*bits >> (tgid % 64)) & 1;
}

static __always_inline __u32 log2_u32(__u32 v)
{
	__u32 r, shift;

	r = (v > 0xFFFF) << 4; v >>= r;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	return r | (v >> 1);
}

/* Addresses and ports as the socket has them now (the source port of a connect is chosen
 * only after SYN_SENT, so this runs again at ESTABLISHED and CLOSE). */
static __always_inline void read_addrs(struct ks_tcp_conn *c, struct sock *sk)
{
	c->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	c->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	c->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (c->family == AF_INET) {
		bpf_core_read(c->laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(c->raddr, 4, &sk->__sk_common.skc_daddr);
	} else {
		bpf_core_read(c->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(c->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

/* tcp_sock's lifetime byte counters, relative to when this connection was first seen. */
static __always_inline void read_bytes(struct ks_tcp_conn *c, struct sock *sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	c->bytes_acked = BPF_CORE_READ(tp, bytes_acked) - c->acked_base;
	c->bytes_received = BPF_CORE_READ(tp, bytes_received) - c->received_base;
}

/* At the end, without the FINs: bytes_acked counts ours once acknowledged, bytes_received
 * theirs once received in order (tcp_fin sets SOCK_DONE). In ESTABLISHED (tcp_probe) neither
 * has happened yet. */
static __always_inline void read_payload_bytes(struct ks_tcp_conn *c, struct sock *sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	read_bytes(c, sk);
	if ((c->flags & KS_TCP_F_FIN_SENT) && c->bytes_acked &&
	    BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq))
		c->bytes_acked -= 1;
	if ((BPF_CORE_READ(sk, __sk_common.skc_flags) & (1UL << SOCK_DONE)) && c->bytes_received)
		c->bytes_received -= 1;
}

static __always_inline __u32 netns_of(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

static __always_inline void take_proc(struct ks_tcp_conn *c, const struct ks_tcp_proc *p,
				      bool peer)
{
	if (peer) {
		c->peer_tgid = p->tgid;
		__builtin_memcpy(c->peer_comm, p->comm, KS_TCP_COMM_LEN);
	} else {
		c->tgid = p->tgid;
		__builtin_memcpy(c->comm, p->comm, KS_TCP_COMM_LEN);
	}
	if (p->excluded)
		c->flags |= KS_TCP_F_EXCLUDED;
}

static __always_inline struct ks_tcp_proc *listener_of(__u32 netns, __u16 port)
{
	struct ks_tcp_listen_key key = {.netns = netns, .port = port};

	return bpf_map_lookup_elem(&listeners, &key);
}

/* A new entry for sk (replacing a stale one: socket memory is reused). */
static __always_inline struct ks_tcp_conn *conn_new(struct sock *sk, __u8 role)
{
	__u64 key = (__u64)sk;
	struct ks_tcp_conn *c;

	if (bpf_map_update_elem(&conns, &key, &zero_conn, BPF_ANY)) {
		count(KS_TCP_CNT_CONN_TABLE_FULL);
		return NULL;
	}
	c = bpf_map_lookup_elem(&conns, &key);
	if (!c)
		return NULL;
	c->conn_id = __sync_fetch_and_add(&next_conn_id, 1) + 1;
	c->role = role;
	c->netns = netns_of(sk);
	read_addrs(c, sk);
	return c;
}

/* The entry of a connection already open when first seen (before the probe started, or lost
 * from a full table). Only full sockets in a connected state: a TIME_WAIT or request socket
 * has no tcp_sock behind the pointer. */
static __always_inline struct ks_tcp_conn *conn_of(struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ks_tcp_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ks_tcp_proc *lst;
	struct tcp_sock *tp;
	__u8 state;

	if (c)
		return c;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (state == TCP_CLOSE || state == TCP_LISTEN || state == TCP_TIME_WAIT ||
	    state == TCP_NEW_SYN_RECV || state == TCP_SYN_SENT || state == TCP_SYN_RECV)
		return NULL;
	c = conn_new(sk, KS_TCP_ROLE_UNKNOWN);
	if (!c)
		return NULL;
	/* A connection on a listening port was accepted from it. */
	lst = listener_of(c->netns, c->lport);
	if (lst) {
		c->role = KS_TCP_ROLE_PASSIVE;
		take_proc(c, lst, false);
	}
	c->flags |= KS_TCP_F_ESTABLISHED;
	tp = (struct tcp_sock *)sk;
	c->acked_base = BPF_CORE_READ(tp, bytes_acked);
	c->received_base = BPF_CORE_READ(tp, bytes_received);
	count(c->flags & KS_TCP_F_EXCLUDED ? KS_TCP_CNT_EXCLUDED : KS_TCP_CNT_ADOPTED);
	return c;
}

static __always_inline bool is_loopback(const struct ks_tcp_conn *c)
{
	const __u8 *a = c->raddr;

	if (c->family == AF_INET)
		return a[0] == 127;
	/* ::1, or ::ffff:127.x.y.z */
	if (a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9])
		return false;
	if (a[10] == 0xff && a[11] == 0xff)
		return a[12] == 127;
	return !(a[10] | a[11] | a[12] | a[13] | a[14]) && a[15] == 1;
}

/* The final record of a connection that reached CLOSE, to the ring buffer without wakeup. */
static __always_inline void emit_closed(const struct ks_tcp_conn *c)
{
	struct ks_tcp_conn *rec;

	if ((c->flags & (KS_TCP_F_EXCLUDED | KS_TCP_F_CLOSED)) != KS_TCP_F_CLOSED)
		return;
	rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	if (!rec) {
		count(KS_TCP_CNT_RINGBUF_DROPS);
		return;
	}
	__builtin_memcpy(rec, c, sizeof(*rec));
	rec->kind = KS_TCP_CLOSE;
	bpf_ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
	count(KS_TCP_CNT_EVENTS);
}

/* connect(): SYN_SENT is set in the connecting task's context. */
static __always_inline int on_syn_sent(struct sock *sk)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 key = (__u64)sk;
	struct ks_tcp_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ks_tcp_proc *lst;

	/* A socket connecting again after a failed attempt: that attempt is over. */
	if (c)
		emit_closed(c);
	c = conn_new(sk, KS_TCP_ROLE_ACTIVE);
	if (!c)
		return 0;
	c->opened_ns = bpf_ktime_get_ns();
	c->tgid = id >> 32;
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	if (is_excluded(c->tgid))
		c->flags |= KS_TCP_F_EXCLUDED;
	/* A loopback destination listens in this network namespace: name it now. */
	if (is_loopback(c)) {
		lst = listener_of(c->netns, c->rport);
		if (lst)
			take_proc(c, lst, true);
	}
	if (c->flags & KS_TCP_F_EXCLUDED)
		count(KS_TCP_CNT_EXCLUDED);
	return 0;
}

/* The child socket of a passive open; named at ESTABLISHED, when its addresses are set. */
static __always_inline int on_syn_recv(struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ks_tcp_conn *c = bpf_map_lookup_elem(&conns, &key);

	if (c && c->role == KS_TCP_ROLE_ACTIVE && !(c->flags & KS_TCP_F_CLOSED))
		return 0;	/* simultaneous open: stays the active end */
	c = conn_new(sk, KS_TCP_ROLE_PASSIVE);
	if (c)
		c->opened_ns = bpf_ktime_get_ns();
	return 0;
}

static __always_inline void tuple_of(const struct ks_tcp_conn *c, struct ks_tcp_tuple *t,
				     bool mirrored)
{
	if (mirrored) {
		__builtin_memcpy(t->laddr, c->raddr, KS_TCP_ADDR_LEN);
		__builtin_memcpy(t->raddr, c->laddr, KS_TCP_ADDR_LEN);
		t->lport = c->rport;
		t->rport = c->lport;
	} else {
		__builtin_memcpy(t->laddr, c->laddr, KS_TCP_ADDR_LEN);
		__builtin_memcpy(t->raddr, c->raddr, KS_TCP_ADDR_LEN);
		t->lport = c->lport;
		t->rport = c->rport;
	}
}

static __always_inline int on_established(struct sock *sk, int oldstate)
{
	__u64 key = (__u64)sk;
	struct ks_tcp_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ks_tcp_tuple t = {};
	struct ks_tcp_proc proc = {}, *found;

	if (!c) {
		/* Its open began before the probe did (or the table was full then). */
		c = conn_new(sk, oldstate == TCP_SYN_SENT ? KS_TCP_ROLE_ACTIVE :
				 KS_TCP_ROLE_PASSIVE);
		if (!c)
			return 0;
		count(KS_TCP_CNT_ADOPTED);
	}
	c->flags |= KS_TCP_F_ESTABLISHED;
	c->established_ns = bpf_ktime_get_ns();
	read_addrs(c, sk);
	if (c->role == KS_TCP_ROLE_ACTIVE) {
		c->acked_base = 1;	/* bytes_acked counts the SYN the SYN-ACK acknowledged */
		/* Now the 4-tuple is final: a server on this node can find its client. */
		if (!c->tgid)
			return 0;
		tuple_of(c, &t, false);
		proc.tgid = c->tgid;
		proc.excluded = !!(c->flags & KS_TCP_F_EXCLUDED);
		__builtin_memcpy(proc.comm, c->comm, KS_TCP_COMM_LEN);
		bpf_map_update_elem(&peers, &t, &proc, BPF_ANY);
		return 0;
	}
	/* Passive: the process is the listener's; the client is known if it runs here. */
	found = listener_of(c->netns, c->lport);
	if (found)
		take_proc(c, found, false);
	tuple_of(c, &t, true);
	found = bpf_map_lookup_elem(&peers, &t);
	if (found)
		take_proc(c, found, true);
	if (c->flags & KS_TCP_F_EXCLUDED)
		count(KS_TCP_CNT_EXCLUDED);
	return 0;
}

/* listen() runs in the owner's context: remember who listens on this port. */
static __always_inline int on_listen(struct sock *sk)
{
	struct ks_tcp_listen_key key = {.netns = netns_of(sk)};
	struct ks_tcp_proc proc = {};

	key.port = BPF_CORE_READ(sk, __sk_common.skc_num);
	proc.tgid = bpf_get_current_pid_tgid() >> 32;
	proc.excluded = is_excluded(proc.tgid);
	bpf_get_current_comm(proc.comm, sizeof(proc.comm));
	bpf_map_update_elem(&listeners, &key, &proc, BPF_ANY);
	return 0;
}

static __always_inline int on_unlisten(struct sock *sk)
{
	struct ks_tcp_listen_key key = {.netns = netns_of(sk)};

	key.port = BPF_CORE_READ(sk, __sk_common.skc_num);
	bpf_map_delete_elem(&listeners, &key);
	return 0;
}

static __always_inline int on_fin_sent(struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct ks_tcp_conn *c = bpf_map_lookup_elem(&conns, &key);

	if (c)
		c->flags |= KS_TCP_F_FIN_SENT;
	return 0;
}

/* Addresses from the tracepoint: at CLOSE the socket's own local port is already released
 * (inet_put_port zeroes it), while the tracepoint copied inet_sport. */
static __always_inline void addrs_from_ctx(struct ks_tcp_conn *c,
					   const struct trace_event_raw_inet_sock_set_state *ctx)
{
	c->family = ctx->family;
	c->lport = ctx->sport;
	c->rport = ctx->dport;
	/* Arrays in the context cannot be loaded through a moved ctx pointer: copy them. */
	if (c->family == AF_INET) {
		bpf_probe_read_kernel(c->laddr, 4, ctx->saddr);
		bpf_probe_read_kernel(c->raddr, 4, ctx->daddr);
	} else {
		bpf_probe_read_kernel(c->laddr, 16, ctx->saddr_v6);
		bpf_probe_read_kernel(c->raddr, 16, ctx->daddr_v6);
	}
}

/* CLOSE: freeze what the record reports; it is sent when the socket is destroyed. */
static __always_inline int on_close(struct sock *sk,
				    const struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u64 key = (__u64)sk;
	struct ks_tcp_conn *c = bpf_map_lookup_elem(&conns, &key);
	struct ks_tcp_tuple t = {};

	if (!c)
		return 0;	/* never seen open: nothing of it was counted */
	c->flags |= KS_TCP_F_CLOSED;
	c->closed_ns = bpf_ktime_get_ns();
	/* Set before CLOSE by tcp_done_with_error / ICMP errors; the application may clear it
	 * (SO_ERROR) before the socket is destroyed. */
	c->sk_err = BPF_CORE_READ(sk, sk_err);
	addrs_from_ctx(c, ctx);
	if (c->flags & KS_TCP_F_ESTABLISHED)
		read_payload_bytes(c, sk);
	if (c->role == KS_TCP_ROLE_ACTIVE && c->tgid) {
		tuple_of(c, &t, false);
		bpf_map_delete_elem(&peers, &t);
	}
	return 0;
}

SEC("tp/sock/inet_sock_set_state")
int ks_tcp_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	switch (ctx->newstate) {
	case TCP_SYN_SENT:
		return on_syn_sent(sk);
	case TCP_SYN_RECV:
		return on_syn_recv(sk);
	case TCP_ESTABLISHED:
		return on_established(sk, ctx->oldstate);
	case TCP_LISTEN:
		return on_listen(sk);
	case TCP_FIN_WAIT1:
	case TCP_LAST_ACK:
		return on_fin_sent(sk);
	case TCP_CLOSE:
		return ctx->oldstate == TCP_LISTEN ? on_unlisten(sk) : on_close(sk, ctx);
	}
	return 0;
}

/* The socket is going away: send its record (once it reached CLOSE) and forget it. */
SEC("tp/tcp/tcp_destroy_sock")
int ks_tcp_destroy(struct trace_event_raw_tcp_event_sk *ctx)
{
	__u64 key = (__u64)ctx->skaddr;
	struct ks_tcp_conn *c = bpf_map_lookup_elem(&conns, &key);

	if (!c)
		return 0;
	emit_closed(c);
	bpf_map_delete_elem(&conns, &key);
	return 0;
}

/* The segments in one skb sent again: tcp_skb_pcount(), TCP_SKB_CB(skb)->tcp_gso_segs in the
 * skb's control buffer, set before the tracepoint fires (after any split of the skb). */
static __always_inline __u32 skb_segments(const struct sk_buff *skb)
{
	const struct tcp_skb_cb *cb = (const void *)skb + bpf_core_field_offset(skb->cb);
	__u16 segs = BPF_CORE_READ(cb, tcp_gso_segs);

	return segs ? segs : 1;
}

SEC("tp/tcp/tcp_retransmit_skb")
int ks_tcp_retransmit(struct trace_event_raw_tcp_retransmit_skb *ctx)
{
	struct ks_tcp_conn *c = conn_of((struct sock *)ctx->skaddr);

	/* Newer kernels (the tracepoint has `err`) also fire it for a retransmit that was not
	 * sent: -EBUSY while the first copy is still in a host queue, no route, no memory. The
	 * kernel gives up on those before it adds to total_retrans, and so does this. (One that
	 * a full qdisc then refuses is in total_retrans and not here: it never left the host.) */
	if (bpf_core_field_exists(ctx->err) && ctx->err)
		return 0;
	if (c && !(c->flags & KS_TCP_F_EXCLUDED))
		__sync_fetch_and_add(&c->retransmits,
				     skb_segments((const struct sk_buff *)ctx->skbaddr));
	return 0;
}

SEC("tp/tcp/tcp_send_reset")
int ks_tcp_send_reset(struct trace_event_raw_tcp_send_reset *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct ks_tcp_conn *c;

	if (!sk) {
		/* A segment for no socket, e.g. a SYN to a closed port: the refusing end. */
		count(KS_TCP_CNT_RST_SENT_NO_SOCKET);
		return 0;
	}
	/* An abortive close resets after CLOSE: the entry is still there until destroy. A
	 * request or TIME_WAIT socket is never adopted (conn_of checks the state). */
	c = conn_of(sk);
	if (c && !(c->flags & KS_TCP_F_EXCLUDED))
		__sync_fetch_and_add(&c->resets_sent, 1);
	return 0;
}

SEC("tp/tcp/tcp_receive_reset")
int ks_tcp_receive_reset(struct trace_event_raw_tcp_event_sk *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct ks_tcp_conn *c = conn_of(sk);

	if (!c || (c->flags & KS_TCP_F_EXCLUDED))
		return 0;
	__sync_fetch_and_add(&c->resets_received, 1);
	/* Runs before tcp_done: the state is still the one the reset hit. */
	if (BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_SYN_SENT)
		c->flags |= KS_TCP_F_RST_SYN_SENT;
	return 0;
}

/* Every segment received in ESTABLISHED: the hot path, one lookup and a few stores. */
SEC("tp/tcp/tcp_probe")
int ks_tcp_probe(struct trace_event_raw_tcp_probe *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct ks_tcp_conn *c = conn_of(sk);
	__u32 srtt = ctx->srtt;	/* tp->srtt_us >> 3: µs */
	__u32 slot;

	if (!c || (c->flags & KS_TCP_F_EXCLUDED))
		return 0;
	read_bytes(c, sk);
	if (!srtt)
		return 0;	/* no RTT sample yet */
	slot = log2_u32(srtt);
	if (slot >= KS_TCP_RTT_SLOTS)
		slot = KS_TCP_RTT_SLOTS - 1;
	__sync_fetch_and_add(&c->rtt_hist[slot], 1);
	__sync_fetch_and_add(&c->srtt_sum_us, srtt);
	/* last/min/max race between CPUs only when one connection's segments do: harmless. */
	c->srtt_last_us = srtt;
	if (!c->srtt_min_us || srtt < c->srtt_min_us)
		c->srtt_min_us = srtt;
	if (srtt > c->srtt_max_us)
		c->srtt_max_us = srtt;
	return 0;
}
