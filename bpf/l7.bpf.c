// SPDX-License-Identifier: GPL-2.0
/* l7: TCP connection and payload events, from tracepoints (no kprobes needed).
 *
 * Reads and writes (read, write, readv, writev, sendto, recvfrom, sendmsg, recvmsg, and the
 * mmsg calls) are seen when they return: in the fast build where the socket layer reports
 * them (sock:sock_send_length/sock_recv_length, arguments from the task's saved registers)
 * and connections where TCP reports them, with no syscall tracepoint at all; in the compat
 * build by an entry program that stashes the arguments per thread and an exit program per
 * syscall. Each decides early and cheaply: moved no data? filtered
 * process? not a TCP/UDP socket? -> return. Otherwise it copies a bounded payload prefix and
 * submits one event to the ring buffer without a wakeup (the user side polls on a timer; a
 * wakeup per event costs ~5 us here). On Linux >= 6.16 the
 * event is written straight into its ring-buffer record (one copy of the payload, user memory
 * -> ring); older kernels build it in per-CPU scratch and copy it in (see struct l7_out).
 *
 * UDP has no connections: each (socket, peer address) pair is a flow with an identity of its
 * own, and only datagrams that start with a DNS header are sent (DNS is the one UDP protocol
 * parsed). A flow's role is client if its first datagram seen went out, server otherwise.
 *
 * TLS: uprobes on the TLS library's SSL_read/SSL_write (and _ex forms) send the plaintext,
 * flagged L7_FLAG_TLS, on the connection of the socket the call used. That socket is learnt
 * from the syscall the library makes inside the call (and remembered per SSL object for calls
 * served from its buffer). Ciphertext is never sent: syscall data inside a TLS call, and any
 * data of a connection whose first bytes were a TLS record, are counted and dropped.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "l7.h"

/* Not in vmlinux.h: these are macros in the kernel. */
#define AF_INET		2
#define AF_INET6	10
#define S_IFMT		00170000
#define S_IFSOCK	0140000
#define EINPROGRESS	115
#define EPIPE		32
#define ECONNRESET	104
#define MSG_PEEK	2

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader before load; the verifier then prunes on the known values. */
const volatile __u32 capture_bytes = 4096;
const volatile bool filter_all = false;	/* attached but every event filtered out: cost floor */

__u64 next_conn_id = 0;

/* What a thread's pending syscall needs at exit. iovcnt == 0 means buf is a plain buffer. */
struct l7_args {
	__u64 buf;		/* buffer, struct iovec array, or struct mmsghdr array (mmsg) */
	__u64 sk;		/* struct sock * (0 for accept: known only at exit) */
	__u64 enter_ns;		/* when the syscall was entered */
	__u64 len;		/* bytes asked for (plain buffers of write/sendto only) */
	__u64 name;		/* UDP: struct sockaddr * of the peer (sendto/recvfrom), or 0 */
	__u32 iovcnt;		/* iovecs, or mmsghdrs when mmsg */
	__s32 fd;
	enum l7_kind kind;
	__u8  transport;	/* enum l7_transport */
	__u8  mmsg;		/* sendmmsg/recvmmsg */
	__u16 _pad;
	__u64 cookie;		/* fast build, UDP: the socket's cookie (udp_last_flow's key) */
};

/* Identity of one TCP connection, keyed by its struct sock *. */
struct l7_conn {
	__u64 conn_id;
	enum l7_role role;
	__u16 lport;
	__u16 rport;
	__u8  family;
	__u8  transport;
	__u8  tls;		/* TLS connection: its syscall data is ciphertext */
	__u8  seen;		/* data seen (the first bytes decide tls) */
	__u8  opened;		/* fast build: L7_CONNECT/L7_ACCEPT still to send, at the first data */
	__u8  owned;		/* fast build: tgid and comm are the process that moved data */
	__u16 _pad;
	__u32 tgid;		/* fast build: for the close, which TCP reports in no process */
	__u32 _pad2;
	__u64 opened_ns;	/* fast build: when TCP reported the connect or the accept */
	__u8  laddr[L7_ADDR_LEN];
	__u8  raddr[L7_ADDR_LEN];
	char  comm[L7_COMM_LEN];
};

/* A thread inside SSL_read/SSL_write. */
struct l7_tls_call {
	__u64 ssl;
	__u64 buf;
	__u64 nbytes;		/* _ex forms: size_t * the byte count is returned in, else 0 */
	__u64 sk;		/* learnt from the syscall made inside the call, or 0 */
	__u64 enter_ns;
	enum l7_kind kind;
	__u32 _pad;
};

/* A UDP flow: one socket and one peer. */
struct l7_flow_key {
	__u64 sk;
	__u8  raddr[L7_ADDR_LEN];
	__u16 rport;
	__u16 _pad[3];
};

/* Slack after payload[]: the verifier bounds offset and length separately (each <= max). */
struct l7_scratch {
	struct l7_event ev;
	__u8 slack[L7_CAPTURE_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, L7_RINGBUF_BYTES);
} events SEC(".maps");

#ifdef L7_COMPAT
/* The pending syscall of each thread (the fast build has none: no syscall tracepoints). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);	/* a thread killed in a syscall never exits it */
	__uint(max_entries, L7_MAX_INFLIGHT);
	__type(key, __u64);			/* pid_tgid */
	__type(value, struct l7_args);
} inflight SEC(".maps");
#endif

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_MAX_CONNECTIONS);
	__type(key, __u64);			/* struct sock * */
	__type(value, struct l7_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_MAX_UDP_FLOWS);
	__type(key, struct l7_flow_key);
	__type(value, struct l7_conn);
} udp_flows SEC(".maps");

/* A UDP socket's latest flow, closed with the socket (a connected socket has only that one;
 * a server's other flows are expired by the stream worker). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_MAX_UDP_FLOWS);
	__type(key, __u64);			/* struct sock * */
	__type(value, struct l7_flow_key);
} udp_last_flow SEC(".maps");	/* fast build: keyed by socket cookie (the release hook has no pointer) */

#ifndef L7_COMPAT
/* Where a thread's last received datagram came from, as the kernel reported it to the
 * cgroup recvmsg hook just before sock_recv_length fires (see udp_recv_from). */
struct l7_udp_src {
	__u8  addr[L7_ADDR_LEN];
	__u16 port;		/* host order */
	__u16 lport;		/* the receiving socket's port: the stash is for that socket only */
	__u8  family;
	__u8  _pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_MAX_INFLIGHT);
	__type(key, __u64);			/* pid_tgid */
	__type(value, struct l7_udp_src);
} udp_src SEC(".maps");

/* sendmmsg/recvmmsg: the socket layer reports each datagram in turn, not which one; the
 * thread's place in its mmsghdr array (see mmsg_index). */
struct l7_mmsg_at {
	__u64 vec;
	__u32 next;
	__u32 vlen;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct l7_mmsg_at);
} mmsg_at SEC(".maps");
#endif

/* Per-process bits, one u64 word per 64 tgids: an array lookup is inlined by the verifier,
 * a hash lookup is a helper call that hashes. Every data syscall asks both. The loader sizes
 * them to the kernel's pid_max (default here: 4M pids, 512 KiB each). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L7_TGID_WORDS);
	__type(key, __u32);			/* tgid / 64 */
	__type(value, __u64);			/* bit tgid % 64 */
} excluded_tgids SEC(".maps");			/* set by the user side */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L7_TGID_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} tls_tgids SEC(".maps");			/* set by the first SSL_read/SSL_write of a process */

/* Processes whose children are excluded as they are forked (kubesight's supervisor, and any
 * process named in excluded_comms), so that a component it restarts is never traced, not
 * even until the user side reads its pid file. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L7_TGID_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} excluded_trees SEC(".maps");

/* Process names never traced (probe.exclude_comms, and "kubesight"): asked only where a
 * process starts, at fork and at exec, never per event. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L7_MAX_EXCLUDED_COMMS);
	__type(key, char[L7_COMM_LEN]);
	__type(value, __u8);
} excluded_comms SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, L7_CNT__MAX);
	__type(key, __u32);			/* enum l7_counter (array keys must be plain ints) */
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_MAX_INFLIGHT);
	__type(key, __u64);			/* pid_tgid */
	__type(value, struct l7_tls_call);
} tls_calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_MAX_CONNECTIONS);
	__type(key, __u64);			/* SSL * */
	__type(value, __u64);			/* struct sock * */
} tls_sockets SEC(".maps");

/* Events are too big for the 512-byte stack: build them here (unless written in place). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_scratch);
} scratch SEC(".maps");

/* Keeps the layout types in the object's BTF, where the user side's tests read them. */
struct l7_btf_anchor {
	enum l7_kind kind;
	enum l7_role role;
	enum l7_counter counter;
	enum l7_transport transport;
	enum l7_flag flag;
	struct l7_event *event;
} l7_btf_anchor __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u64 *val = bpf_map_lookup_elem(&counters, &idx);

	if (val)
		*val += 1;	/* per-CPU slot: no atomic needed */
}

static __always_inline __u64 *tgid_word(void *bits, __u32 tgid)
{
	__u32 word = tgid / 64;

	return bpf_map_lookup_elem(bits, &word);
}

static __always_inline bool tgid_bit(void *bits, __u32 tgid)
{
	__u64 *word = tgid_word(bits, tgid);

	return word && (*word >> (tgid % 64)) & 1;
}

/* First filter of every program: not one event from an excluded process. */
static __always_inline bool traced(__u64 pid_tgid)
{
	if (filter_all)
		return false;
	return !tgid_bit(&excluded_tgids, pid_tgid >> 32);
}

#ifndef L7_COMPAT
/* Fast build (Linux >= 6.4): BTF pointers and bpf_rdonly_cast load kernel fields directly,
 * not one bpf_probe_read_kernel call per field. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
#else
/* Compat build: syscall tracepoints hand over fds. fd -> struct sock * if it is a TCP or UDP
 * socket over IPv4/IPv6, else NULL (no kprobes: walk the fd table with CO-RE); *transport
 * tells which. */
static __always_inline struct sock *inet_sock_of_fd(int fd, __u8 *transport)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *file = NULL;
	struct socket *sock;
	struct sock *sk;
	__u16 family, proto;
	umode_t mode;

	if (fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file)
		return NULL;
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK) {
		count(L7_CNT_SKIPPED_NOT_SOCKET);
		return NULL;
	}
	sock = BPF_CORE_READ(file, private_data);
	sk = BPF_CORE_READ(sock, sk);
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	proto = BPF_CORE_READ(sk, sk_protocol);
	/* AF_UNIX, netlink and raw sockets pass the S_IFSOCK test too. */
	if ((family != AF_INET && family != AF_INET6) ||
	    (proto != IPPROTO_TCP && proto != IPPROTO_UDP)) {
		count(L7_CNT_SKIPPED_NOT_INET);
		return NULL;
	}
	*transport = proto;
	return sk;
}

/* Connections (TCP) only: accept, connect and close of a stream socket. */
static __always_inline struct sock *tcp_sock_of_fd(int fd)
{
	__u8 transport = 0;
	struct sock *sk = inet_sock_of_fd(fd, &transport);

	return sk && transport == L7_TCP ? sk : NULL;
}

/* Stash what the exit program needs, keyed by thread. */
static __always_inline void stash(__u64 pid_tgid, enum l7_kind kind, int fd, struct sock *sk,
				  __u64 buf, __u32 iovcnt, __u64 len, __u8 transport, __u64 name,
				  __u8 mmsg)
{
	struct l7_args fresh = {}, *args = &fresh;

	args->buf = buf;
	args->sk = (__u64)sk;
	args->iovcnt = iovcnt;
	args->fd = fd;
	args->kind = kind;
	args->enter_ns = kind == L7_DATA_OUT ? bpf_ktime_get_ns() : 0;
	args->len = len;
	args->transport = transport;
	args->name = name;
	args->mmsg = mmsg;
	if (bpf_map_update_elem(&inflight, &pid_tgid, args, BPF_ANY))
		count(L7_CNT_INFLIGHT_FULL);
}

/* Take (and remove) this thread's stash; false if the entry program did not stash. */
static __always_inline bool unstash(__u64 pid_tgid, struct l7_args *out)
{
	struct l7_args *args;

	if (filter_all)
		return false;	/* nothing was stashed: skip even the lookup */
	args = bpf_map_lookup_elem(&inflight, &pid_tgid);
	if (!args)
		return false;
	*out = *args;
	bpf_map_delete_elem(&inflight, &pid_tgid);
	return true;
}
#endif

/* A TCP connection's addresses; skc_dport is network order, skc_num not. */
static __always_inline void conn_addresses(struct l7_conn *conn, struct sock *sk)
{
	conn->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	conn->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	conn->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (conn->family == AF_INET) {
		bpf_core_read(conn->laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(conn->raddr, 4, &sk->__sk_common.skc_daddr);
	} else {
		bpf_core_read(conn->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(conn->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

/* Assign a new connection id and record addresses. */
static __always_inline void conn_new(struct l7_conn *conn, struct sock *sk, enum l7_role role)
{
	__u64 key = (__u64)sk;

	conn->conn_id = __sync_fetch_and_add(&next_conn_id, 1) + 1;
	conn->role = role;
	conn->transport = L7_TCP;
	conn_addresses(conn, sk);
	if (bpf_map_update_elem(&conns, &key, conn, BPF_ANY))
		count(L7_CNT_CONN_TABLE_FULL);
}

/* The process's name, not the calling thread's (bpf_get_current_comm): runtimes name their
 * I/O threads ("rdk:broker1", "isc-net-0000"), and a workload is the process. */
static __always_inline void process_comm(char *dst)
{
#ifndef L7_COMPAT
	/* Two direct BTF loads, no helper call. dst is 8-byte aligned (l7_event.comm). */
	struct task_struct *leader = bpf_get_current_task_btf()->group_leader;

	((__u64 *)dst)[0] = *(const __u64 *)&leader->comm[0];
	((__u64 *)dst)[1] = *(const __u64 *)&leader->comm[8];
#else
	struct task_struct *leader = BPF_CORE_READ((struct task_struct *)bpf_get_current_task(),
						   group_leader);

	bpf_probe_read_kernel(dst, L7_COMM_LEN, leader->comm);
#endif
}

/* The TCP connection's health as of this event: each request knows the RTT and the
 * retransmits of the connection it travelled on. */
static __always_inline void tcp_health(struct l7_event *ev, __u64 sk)
{
#ifndef L7_COMPAT
	struct tcp_sock *tp = bpf_rdonly_cast((void *)sk, bpf_core_type_id_kernel(struct tcp_sock));

	ev->srtt_us = tp->srtt_us >> 3;	/* kept <<3 in the kernel */
	ev->retrans = tp->total_retrans;
#else
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	ev->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
	ev->retrans = BPF_CORE_READ(tp, total_retrans);
#endif
}

/* --- Building an event ------------------------------------------------------------------
 *
 * event_start -> fill the header, copy_message -> event_submit (or event_drop). Where the
 * event is built depends on the kernel, decided at load time:
 *   direct   (fast build, Linux >= 6.16: bpf_probe_read_user_dynptr) the ring-buffer record
 *            is reserved first, header + the payload size asked for, and the payload is read
 *            from user memory straight into it: one copy, no scratch, no bpf_ringbuf_output.
 *   scratch  (compat build, or a fast build on 6.4..6.15) the event is built in per-CPU
 *            scratch and bpf_ringbuf_output copies header + payload into the ring.
 * A weak kfunc that the kernel lacks resolves to NULL: the check is a constant at load time
 * and the verifier never sees the other path. */
#define L7_HEAD_LEN offsetof(struct l7_event, payload)

extern int bpf_probe_read_user_dynptr(struct bpf_dynptr *dptr, __u32 off, __u32 size,
				      const void *unsafe_ptr__ign) __ksym __weak;
#ifndef L7_COMPAT
#ifndef bpf_ksym_exists		/* libbpf >= 1.2 defines it */
#define bpf_ksym_exists(sym) ({							\
	_Static_assert(!__builtin_constant_p(!!sym), #sym " must be declared __weak");	\
	!!sym;									\
})
#endif
#define direct_records() bpf_ksym_exists(bpf_probe_read_user_dynptr)
#else
#define direct_records() false
#endif

struct l7_out {
	struct bpf_dynptr rec;	/* direct: the reserved record */
	struct l7_event *ev;	/* the header: in the record (direct) or in scratch */
#ifdef L7_BATCH
	bool staged;		/* ev is in this CPU's stage (bench build l7_batch.bpf.o) */
#endif
};

/* The header of an event of conn. */
static __always_inline void event_fill(struct l7_event *ev, enum l7_kind kind,
				       const struct l7_conn *conn, int fd, __s64 size,
				       __u64 pid_tgid, __u64 ts_ns)
{
	ev->kind = kind;
	ev->role = conn->role;
	ev->family = conn->family;
	ev->transport = conn->transport;
	ev->lport = conn->lport;
	ev->rport = conn->rport;
	ev->tgid = pid_tgid >> 32;
	ev->fd = fd;
	ev->conn_id = conn->conn_id;
	ev->ts_ns = ts_ns;
	ev->size = size;
	ev->cap_len = 0;
	ev->flags = 0;
	ev->srtt_us = 0;
	ev->retrans = 0;
	__builtin_memcpy(ev->laddr, conn->laddr, L7_ADDR_LEN);
	__builtin_memcpy(ev->raddr, conn->raddr, L7_ADDR_LEN);
	process_comm(ev->comm);
}

/* Start an event with room for cap (capture_len) payload bytes and fill its header; NULL if
 * there is none (ring buffer full: counted). */
static __always_inline struct l7_event *event_start(struct l7_out *out, __u64 cap,
						     enum l7_kind kind, const struct l7_conn *conn,
						     int fd, __s64 size, __u64 pid_tgid, __u64 ts_ns)
{
	struct l7_event *ev;

#ifdef L7_BATCH
	out->staged = false;
#endif
	if (direct_records()) {
		if (bpf_ringbuf_reserve_dynptr(&events, L7_HEAD_LEN + cap, 0, &out->rec)) {
			bpf_ringbuf_discard_dynptr(&out->rec, BPF_RB_NO_WAKEUP); /* required */
			count(L7_CNT_RINGBUF_DROPS);
			return NULL;
		}
		/* The header is written in place (bpf_dynptr_slice_rdwr is for packets only). */
		ev = bpf_dynptr_data(&out->rec, 0, L7_HEAD_LEN);
		if (!ev) {	/* cannot happen: the record is contiguous and big enough */
			bpf_ringbuf_discard_dynptr(&out->rec, BPF_RB_NO_WAKEUP);
			return NULL;
		}
	} else {
		__u32 zero = 0;
		struct l7_scratch *s = bpf_map_lookup_elem(&scratch, &zero);

		if (!s)
			return NULL;
		ev = &s->ev;
	}
	out->ev = ev;
	event_fill(ev, kind, conn, fd, size, pid_tgid, ts_ns);
	return ev;
}

/* Submit header + cap_len bytes of payload; no wakeup, the reader polls on a timer. */
static __always_inline void event_submit(struct l7_out *out, __u64 cap_len)
{
	struct l7_event *ev = out->ev;

	if (direct_records()) {
		/* No clamp: cap_len <= the size reserved. A record keeps that size; bytes past
		 * cap_len (a short copy) are not payload, the reader goes by cap_len. */
		ev->cap_len = cap_len;
		bpf_ringbuf_submit_dynptr(&out->rec, BPF_RB_NO_WAKEUP);
		count(L7_CNT_EVENTS);
		return;
	}
	if (cap_len > L7_CAPTURE_MAX)
		cap_len = L7_CAPTURE_MAX;
	ev->cap_len = cap_len;
	if (bpf_ringbuf_output(&events, ev, L7_HEAD_LEN + cap_len, BPF_RB_NO_WAKEUP))
		count(L7_CNT_RINGBUF_DROPS);
	else
		count(L7_CNT_EVENTS);
}

/* Not worth sending after all (the caller counts why). */
static __always_inline void event_drop(struct l7_out *out)
{
	if (direct_records())
		bpf_ringbuf_discard_dynptr(&out->rec, BPF_RB_NO_WAKEUP);
}

/* Payload bytes to capture of a send/receive that moved `sent` bytes. */
static __always_inline __u64 capture_len(__u64 sent)
{
	__u64 cap = capture_bytes;

	if (cap > L7_CAPTURE_MAX)
		cap = L7_CAPTURE_MAX;
	if (sent <= cap)
		return sent;
	count(L7_CNT_TRUNCATED);
	return cap;
}

/* Copy len user bytes to payload[off..]; false on a fault (the caller counts it, once per
 * message: a map update inside the iovec loop multiplied the verifier's states by four).
 * Direct: the kfunc checks the bounds against the record at run time, and comparisons the
 * verifier could decide would only make it track exact lengths. Scratch: u64 lengths bounded
 * explicitly (off < want <= capture_bytes, so never false here), or clang 14 loses the bound
 * ("R2 min value is negative"). */
static __always_inline bool copy_payload(struct l7_out *out, __u64 off, __u64 src, __u64 len)
{
#ifdef L7_BATCH
	if (out->staged)
		return off < L7_CAPTURE_MAX && len <= L7_CAPTURE_MAX &&
		       !bpf_probe_read_user(out->ev->payload + off, len, (const void *)src);
#endif
	if (direct_records())	/* checked against the reservation at run time */
		return !bpf_probe_read_user_dynptr(&out->rec, L7_HEAD_LEN + off, len,
						   (const void *)src);
	if (off >= L7_CAPTURE_MAX || len > L7_CAPTURE_MAX)
		return false;
	return !bpf_probe_read_user(out->ev->payload + off, len, (const void *)src);
}

/* Walk up to L7_MAX_IOVECS iovecs until want bytes are copied; *failed on a fault. */
static __always_inline __u64 copy_iovecs(struct l7_out *out, __u64 iovp, __u32 iovcnt,
					 __u64 want, bool *failed)
{
	struct iovec iov;
	__u64 off = 0, n;

	for (int i = 0; i < L7_MAX_IOVECS; i++) {
		if (i >= iovcnt || off >= want)
			break;
		if (bpf_probe_read_user(&iov, sizeof(iov), (const void *)(iovp + i * sizeof(iov))))
			break;
		n = iov.iov_len;
		if (n > want - off)
			n = want - off;
		if (!copy_payload(out, off, (__u64)iov.iov_base, n)) {
			*failed = true;
			break;
		}
		off += n;
	}
	return off;
}

/* Copy want bytes (capture_len) of one send/receive's payload; returns bytes copied. */
static __always_inline __u64 copy_message(struct l7_out *out, __u64 buf, __u32 iovcnt,
					  __u64 want)
{
	bool failed = false;
	__u64 got;

	if (iovcnt == 0) {
		failed = !copy_payload(out, 0, buf, want);
		got = failed ? 0 : want;
	} else {
		got = copy_iovecs(out, buf, iovcnt, want, &failed);
	}
	if (failed)
		count(L7_CNT_PAYLOAD_READ_FAILED);
	return got;
}

/* The first n payload bytes (n constant), for the protocol checks below; the caller has
 * checked that at least n were copied. NULL if they cannot be read. */
static __always_inline const __u8 *payload_head(struct l7_out *out, __u32 n)
{
	if (direct_records())
		return bpf_dynptr_data(&out->rec, L7_HEAD_LEN, n);
	return out->ev->payload;
}

/* A TLS record header where a connection's data starts: a ClientHello/ServerHello, or
 * application data on a connection that was open before the probe started. */
static __always_inline bool looks_like_tls(struct l7_out *out, __u64 got, __u8 role)
{
	const __u8 *p;
	__u16 len;

	if (got < 6)
		return false;
	p = payload_head(out, 6);
	if (!p || p[1] != 3 || p[2] > 4)
		return false;
	len = (__u16)p[3] << 8 | p[4];
	if (len == 0 || len > 18432)
		return false;
	if (p[0] == 0x16)
		return p[5] == 1 || p[5] == 2;
	return p[0] == 0x17 && role == L7_ROLE_UNKNOWN;
}

/* Syscall data inside SSL_read/SSL_write: ciphertext. Tell the call which socket it uses and
 * mark the connection TLS; the uprobe at return sends the plaintext instead. */
static __always_inline bool inside_tls_call(__u64 id, struct sock *sk)
{
	struct l7_tls_call *call;
	struct l7_conn *conn;
	__u64 key = (__u64)sk;

	if (!tgid_bit(&tls_tgids, id >> 32))
		return false;	/* the process never called the TLS library */
	call = bpf_map_lookup_elem(&tls_calls, &id);
	if (!call)
		return false;
	call->sk = key;
	conn = bpf_map_lookup_elem(&conns, &key);
	if (conn)
		conn->tls = 1;
	count(L7_CNT_TLS_CIPHERTEXT);
	return true;
}

#ifdef L7_COMPAT	/* the fast build has no syscall tracepoints */
static __always_inline int on_data_enter(enum l7_kind kind, int fd, __u64 buf, __u32 iovcnt,
					 __u64 len, __u64 name, __u8 mmsg)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u8 transport = 0;
	struct sock *sk;

	if (!traced(id))
		return 0;
	sk = inet_sock_of_fd(fd, &transport);
	if (!sk || (kind == L7_CONNECT && transport != L7_TCP))
		return 0;	/* a UDP connect() only sets the default peer: no connection */
	if (mmsg && transport != L7_UDP)
		return 0;
	if (transport == L7_TCP && kind != L7_CONNECT && inside_tls_call(id, sk))
		return 0;
	stash(id, kind, fd, sk, buf, iovcnt, len, transport, name, mmsg);
	return 0;
}

/* sendmsg/recvmsg: the iovec array (and a UDP peer's address) live in the user's msghdr. */
static __always_inline int on_msg_enter(enum l7_kind kind, int fd, __u64 msgp)
{
	struct user_msghdr msg;

	if (bpf_probe_read_user(&msg, sizeof(msg), (const void *)msgp))
		return 0;
	return on_data_enter(kind, fd, (__u64)msg.msg_iov, msg.msg_iovlen, 0,
			     (__u64)msg.msg_name, 0);
}
#endif

/* The DNS header's fixed bits: opcode QUERY, exactly one question. Anything else on UDP is
 * not worth a ring-buffer slot (the user side has no other UDP parser). */
static __always_inline bool looks_like_dns(struct l7_out *out, __u64 got)
{
	const __u8 *p;

	if (got < 12)
		return false;
	p = payload_head(out, 12);
	return p && (p[2] & 0x78) == 0 && p[4] == 0 && p[5] == 1;
}

/* The peer of one datagram: the address the syscall names, else the connected peer. A
 * received datagram's sender reaches the syscall's buffer only after the socket layer
 * returns: the fast build has it from the cgroup recvmsg hook (udp_recv_from), the compat
 * build sends the datagram from the syscall's exit (name is read then). */
static __always_inline void udp_peer(struct sock *sk, __u64 name, enum l7_kind kind,
				     struct l7_flow_key *key, __u8 *family)
{
	struct sockaddr_in6 sa = {};

	*family = BPF_CORE_READ(sk, __sk_common.skc_family);
#ifndef L7_COMPAT
	if (kind == L7_DATA_IN) {
		__u64 id = bpf_get_current_pid_tgid();
		struct l7_udp_src *src = bpf_map_lookup_elem(&udp_src, &id);

		name = 0;	/* still the caller's old bytes at sock_recv_length */
		if (src && src->lport == BPF_CORE_READ(sk, __sk_common.skc_num) && src->family) {
			*family = src->family;
			key->rport = src->port;
			__builtin_memcpy(key->raddr, src->addr, L7_ADDR_LEN);
			src->family = 0;	/* one datagram's */
			return;
		}
	}
#endif
	if (name && !bpf_probe_read_user(&sa, sizeof(struct sockaddr_in), (const void *)name)) {
		if (sa.sin6_family == AF_INET) {
			struct sockaddr_in *in = (struct sockaddr_in *)&sa;

			*family = AF_INET;
			key->rport = bpf_ntohs(in->sin_port);
			__builtin_memcpy(key->raddr, &in->sin_addr, 4);
			return;
		}
		if (sa.sin6_family == AF_INET6 &&
		    !bpf_probe_read_user(&sa, sizeof(sa), (const void *)name)) {
			*family = AF_INET6;
			key->rport = bpf_ntohs(sa.sin6_port);
			__builtin_memcpy(key->raddr, &sa.sin6_addr, 16);
			return;
		}
	}
	key->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (*family == AF_INET)
		bpf_core_read(key->raddr, 4, &sk->__sk_common.skc_daddr);
	else
		bpf_core_read(key->raddr, 16, &sk->__sk_common.skc_v6_daddr);
}

/* The flow of one datagram; a new flow gets an identity and becomes its socket's latest. */
static __always_inline bool udp_flow(struct sock *sk, __u64 name, enum l7_kind kind,
				     __u64 sock_key, struct l7_conn *conn)
{
	struct l7_flow_key key = {.sk = (__u64)sk};
	struct l7_conn *known;
	__u8 family;

	udp_peer(sk, name, kind, &key, &family);
	known = bpf_map_lookup_elem(&udp_flows, &key);
	/* A flow of a socket that was closed unseen (its struct sock is reused) has another
	 * local port: a new flow. */
	if (known && known->lport == BPF_CORE_READ(sk, __sk_common.skc_num)) {
		*conn = *known;
		return true;
	}
	conn->conn_id = __sync_fetch_and_add(&next_conn_id, 1) + 1;
	conn->role = kind == L7_DATA_OUT ? L7_ROLE_CLIENT : L7_ROLE_SERVER;
	conn->transport = L7_UDP;
	conn->family = family;
	conn->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	conn->rport = key.rport;
	__builtin_memcpy(conn->raddr, key.raddr, L7_ADDR_LEN);
	if (family == AF_INET)
		bpf_core_read(conn->laddr, 4, &sk->__sk_common.skc_rcv_saddr);
	else
		bpf_core_read(conn->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
	if (bpf_map_update_elem(&udp_flows, &key, conn, BPF_ANY)) {
		count(L7_CNT_FLOW_TABLE_FULL);
		return true;	/* still report this datagram, under a one-off identity */
	}
	bpf_map_update_elem(&udp_last_flow, &sock_key, &key, BPF_ANY);
	return true;
}

/* One datagram: payload first (it decides whether this is DNS), then the flow's identity. */
static __always_inline void udp_datagram(const struct l7_args *args, __u64 id, __s64 size,
					 __u64 buf, __u32 iovcnt, __u64 name, __u64 ts)
{
	struct l7_conn conn = {};
	struct l7_out out;
	struct l7_event *ev;
	__u64 want = capture_len(size), got;

	ev = event_start(&out, want, args->kind, &conn, args->fd, size, id, ts);
	if (!ev)
		return;
	got = copy_message(&out, buf, iovcnt, want);
	if (!looks_like_dns(&out, got)) {
		event_drop(&out);
		count(L7_CNT_SKIPPED_UDP_NOT_DNS);
		return;
	}
#ifndef L7_COMPAT
	udp_flow((struct sock *)args->sk, name, args->kind, args->cookie, &conn);
#else
	udp_flow((struct sock *)args->sk, name, args->kind, args->sk, &conn);
#endif
	ev->role = conn.role;
	ev->transport = L7_UDP;
	ev->family = conn.family;
	ev->lport = conn.lport;
	ev->rport = conn.rport;
	ev->conn_id = conn.conn_id;
	__builtin_memcpy(ev->laddr, conn.laddr, L7_ADDR_LEN);
	__builtin_memcpy(ev->raddr, conn.raddr, L7_ADDR_LEN);
	event_submit(&out, got);
}

/* One datagram of a plain send or receive. Not inlined: its stack is not the TCP path's. */
static __noinline int udp_event(const struct l7_args *args, __u64 id, long ret, __u64 ts)
{
	udp_datagram(args, id, ret, args->buf, args->iovcnt, args->name, ts);
	return 0;
}

#ifdef L7_COMPAT
/* sendmmsg/recvmmsg returned ret datagrams: report up to L7_MAX_MMSG of them. */
static __always_inline void udp_mmsg(const struct l7_args *args, __u64 id, long ret, __u64 ts)
{
	struct mmsghdr m;

	for (int i = 0; i < L7_MAX_MMSG; i++) {
		if (i >= ret || i >= args->iovcnt)
			break;
		if (bpf_probe_read_user(&m, sizeof(m),
					(const void *)(args->buf + i * sizeof(struct mmsghdr))))
			break;
		udp_datagram(args, id, m.msg_len, (__u64)m.msg_hdr.msg_iov,
			     m.msg_hdr.msg_iovlen ? m.msg_hdr.msg_iovlen : 1,
			     (__u64)m.msg_hdr.msg_name, ts);
	}
}
#endif

#ifndef L7_COMPAT
/* The first data of a connection, in its process: take the process and the addresses (a
 * client's local port is chosen after SYN_SENT), and send the open event TCP reported where
 * no process was known yet (tcp_state). */
static __always_inline void conn_own(struct l7_conn *conn, __u64 sk, __u64 id, int fd)
{
	struct l7_out out;
	struct l7_event *ev;
	__u8 opened = conn->opened;

	conn_addresses(conn, (struct sock *)sk);
	conn->tgid = id >> 32;
	process_comm(conn->comm);
	conn->owned = 1;
	if (!opened)
		return;
	conn->opened = 0;
	ev = event_start(&out, 0, opened, conn, fd, 0, id, conn->opened_ns);
	if (ev) {
		tcp_health(ev, sk);	/* the handshake gave the first RTT sample */
		event_submit(&out, 0);
	}
}
#endif

/* A send that fails because the peer is gone is still what the process answered (a server
 * logs it as served): report it, size = -errno. EAGAIN etc. are retried later. */
static __always_inline bool send_failed_dead(enum l7_kind kind, long ret)
{
	return kind == L7_DATA_OUT && (ret == -EPIPE || ret == -ECONNRESET);
}

#if defined(L7_BARE_BATCH) || defined(L7_BATCH)
/* Benchmark builds only: a per-CPU staging buffer of events, put in the ring as one record
 * (bare_event below, staged_event further down). The verifier bounds an event at
 * used <= L7_STAGE_BYTES: past that, room for its header and payload (and in l7_batch, where
 * the payload is copied an iovec at a time, for an offset and a length each up to
 * L7_CAPTURE_MAX). A per-CPU value is at most 32 KiB. */
#ifdef L7_BATCH
#define L7_STAGE_BYTES (12 * 1024)
#define L7_STAGE_SLACK (sizeof(struct l7_event) + L7_CAPTURE_MAX)
#else
#define L7_STAGE_BYTES (16 * 1024)
#define L7_STAGE_SLACK sizeof(struct l7_event)
#endif
struct l7_stage {
	__u32 busy;	/* l7_batch: a program is appending (see staged_event) */
	__u32 used;
	__u8 data[L7_STAGE_BYTES + L7_STAGE_SLACK];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_stage);
} stage SEC(".maps");
#endif

#ifdef L7_BARE_BATCH
/* Benchmark build only (bpf/build/l7_bare_batch.bpf.o, mode `bare-batch`): bare's record,
 * appended to a per-CPU staging buffer instead, and the buffer put in the ring with one
 * bpf_ringbuf_output when the next record does not fit. Asks whether batching records in the
 * kernel would close the gap to the floor. Not a design: nothing flushes a quiet CPU's
 * buffer, and only the first iovec is copied. Tracepoint programs run with preemption off, so
 * one CPU's buffer has one writer at a time. */
static __always_inline int bare_event(const struct l7_args *args, long ret)
{
	__u32 zero = 0, used;
	struct l7_stage *st = bpf_map_lookup_elem(&stage, &zero);
	struct l7_event *ev;
	struct iovec iov;
	__u64 want = capture_len((__u64)ret), src = args->buf;

	if (!st)
		return 0;
	used = st->used;
	if (used > L7_STAGE_BYTES)
		used = L7_STAGE_BYTES;
	if (used + L7_HEAD_LEN + want > L7_STAGE_BYTES) {
		if (bpf_ringbuf_output(&events, st->data, used, BPF_RB_NO_WAKEUP))
			count(L7_CNT_RINGBUF_DROPS);
		used = 0;
	}
	if (args->iovcnt) {
		if (bpf_probe_read_user(&iov, sizeof(iov), (const void *)src))
			return 0;
		src = (__u64)iov.iov_base;
		if (want > iov.iov_len)
			want = iov.iov_len;
	}
	if (want > L7_CAPTURE_MAX)
		want = L7_CAPTURE_MAX;
	ev = (struct l7_event *)(st->data + used);
	ev->kind = args->kind;
	ev->size = ret;
	ev->cap_len = want;
	if (bpf_probe_read_user(st->data + used + L7_HEAD_LEN, want, (const void *)src))
		ev->cap_len = 0;
	st->used = used + L7_HEAD_LEN + ev->cap_len;
	return 0;
}
#elif defined(L7_BARE)
/* Benchmark build only (bpf/build/l7_bare.bpf.o, bench/probe_overhead.py mode `bare`): the
 * least any capture does for a TCP send or receive, to measure the rest against. A record of
 * kind, size and payload prefix: no connection identity, addresses, process name or TCP
 * health. Needs records written in place (Linux >= 6.16). */
static __always_inline int bare_event(const struct l7_args *args, long ret)
{
	struct l7_out out;
	struct l7_event *ev;
	__u64 want = capture_len((__u64)ret);

	if (!direct_records())
		return 0;
	if (bpf_ringbuf_reserve_dynptr(&events, L7_HEAD_LEN + want, 0, &out.rec)) {
		bpf_ringbuf_discard_dynptr(&out.rec, BPF_RB_NO_WAKEUP);
		count(L7_CNT_RINGBUF_DROPS);
		return 0;
	}
	ev = bpf_dynptr_data(&out.rec, 0, L7_HEAD_LEN);
	if (!ev) {
		bpf_ringbuf_discard_dynptr(&out.rec, BPF_RB_NO_WAKEUP);
		return 0;
	}
	out.ev = ev;
	ev->kind = args->kind;
	ev->size = ret;
	ev->cap_len = copy_message(&out, args->buf, args->iovcnt, want);
	bpf_ringbuf_submit_dynptr(&out.rec, BPF_RB_NO_WAKEUP);
	return 0;
}
#endif

#ifdef L7_BATCH
/* Benchmark build only (bpf/build/l7_batch.bpf.o, mode `capture-batch`): full capture whose
 * data events (after a connection's first) are appended to a per-CPU staging buffer, put in
 * the ring L7_STAGE_BYTES at a time, and flushed by flush_stage, which the reader runs on
 * every CPU (BPF_PROG_TEST_RUN, BPF_F_TEST_RUN_ON_CPU) before each drain. Measures what
 * batching saves full capture. Not a design yet: records carry several events (no reader
 * decodes them; the bench drains and drops), and one connection's events from two CPUs reach
 * the ring in flush order, not in time order. busy keeps a program that interrupts another
 * on the same CPU (an IRQ, the flush) off a half-written buffer: it goes to the ring. */
/* bench/bpf_cost.py builds variants that leave parts of each staged event out, to price them:
 * the role, family, ports, fd, tgid, addresses and process name; the TCP health; the payload
 * copy. 0 (everything) in bpf/build/l7_batch.bpf.o. */
#ifndef L7_BATCH_SKIP
#define L7_BATCH_SKIP 0
#endif
#define L7_SKIP_HEADER  1
#define L7_SKIP_HEALTH  2
#define L7_SKIP_PAYLOAD 4
static __always_inline void stage_flush(struct l7_stage *st)
{
	__u32 used = st->used;

	if (used > L7_STAGE_BYTES)
		used = L7_STAGE_BYTES;
	if (used && bpf_ringbuf_output(&events, st->data, used, BPF_RB_NO_WAKEUP))
		count(L7_CNT_RINGBUF_DROPS);
	st->used = 0;
}

/* true if the event went into this CPU's stage; false: the caller sends it to the ring. */
static __always_inline bool staged_event(const struct l7_args *args, const struct l7_conn *conn,
					 __u64 id, long ret, __u64 ts, __u64 want)
{
	__u32 zero = 0, used;
	struct l7_stage *st = bpf_map_lookup_elem(&stage, &zero);
	struct l7_out out;
	struct l7_event *ev;
	__u64 got;

	if (!st || st->busy)
		return false;
	st->busy = 1;
	asm volatile("" ::: "memory");
	used = st->used;
	if (used > L7_STAGE_BYTES)
		used = L7_STAGE_BYTES;
	if (used + L7_HEAD_LEN + want > L7_STAGE_BYTES) {
		stage_flush(st);
		used = 0;
	}
	ev = (struct l7_event *)(st->data + used);
	if (L7_BATCH_SKIP & L7_SKIP_HEADER) {	/* what a reader cannot do without */
		ev->kind = args->kind;
		ev->conn_id = conn->conn_id;
		ev->ts_ns = ts;
		ev->size = ret;
		ev->flags = 0;
		ev->srtt_us = 0;
		ev->retrans = 0;
	} else {
		event_fill(ev, args->kind, conn, args->fd, ret, id, ts);
	}
	if (!(L7_BATCH_SKIP & L7_SKIP_HEALTH))
		tcp_health(ev, args->sk);
	out.ev = ev;
	out.staged = true;
	got = L7_BATCH_SKIP & L7_SKIP_PAYLOAD ? 0 : copy_message(&out, args->buf, args->iovcnt,
								    want);
	ev->cap_len = got;
	st->used = used + ((L7_HEAD_LEN + got + 7) & ~7ULL);
	count(L7_CNT_EVENTS);
	asm volatile("" ::: "memory");
	st->busy = 0;
	return true;
}

/* Run by the reader on each CPU before a drain: what that CPU staged goes to the ring.
 * 1: the CPU was inside staged_event (interrupted by this IPI): try again. */
SEC("raw_tp")
int flush_stage(void *ctx)
{
	__u32 zero = 0;
	struct l7_stage *st = bpf_map_lookup_elem(&stage, &zero);

	if (!st)
		return 0;
	if (st->busy)
		return 1;
	stage_flush(st);
	return 0;
}
#endif

/* A data syscall on an inet socket returned ret: send what it moved. */
static __always_inline int data_exit(const struct l7_args *args, __u64 id, long ret, __u64 ts)
{
	struct l7_conn fresh = {}, *conn;
	struct l7_out out;
	struct l7_event *ev;
	__u64 got, want;
	bool dead;

	if (args->transport == L7_UDP) {
		if (ret <= 0)
			return 0;
#ifdef L7_COMPAT
		if (args->mmsg) {
			udp_mmsg(args, id, ret, ts);
			return 0;
		}
#endif
		return udp_event(args, id, ret, ts);
	}
	dead = send_failed_dead(args->kind, ret);
	if (ret <= 0 && !dead)
		return 0;
#ifdef L7_BARE
	if (ret > 0)
		return bare_event(args, ret);
#endif
	conn = bpf_map_lookup_elem(&conns, &args->sk);
	if (!conn) {
		/* Open before the probe started: role unknown, identity from now on. */
		conn_new(&fresh, (struct sock *)args->sk, L7_ROLE_UNKNOWN);
		conn = bpf_map_lookup_elem(&conns, &args->sk);
		if (!conn)
			return 0;	/* not stored (counted): its tls/seen state would be lost */
	}
	if (conn->tls) {
		count(L7_CNT_TLS_CIPHERTEXT);
		return 0;
	}
#ifndef L7_COMPAT
	if (!conn->owned)
		conn_own(conn, args->sk, id, args->fd);
#endif
	want = capture_len(dead ? (args->iovcnt ? L7_CAPTURE_MAX : args->len) : (__u64)ret);
#ifdef L7_BATCH
	if (conn->seen && staged_event(args, conn, id, ret, ts, want))
		return 0;
#endif
	ev = event_start(&out, want, args->kind, conn, args->fd, ret, id, ts);
	if (!ev)
		return 0;
	tcp_health(ev, args->sk);
	got = copy_message(&out, args->buf, args->iovcnt, want);
	if (!conn->seen) {
		conn->seen = 1;
		if (looks_like_tls(&out, got, conn->role)) {
			event_drop(&out);
			conn->tls = 1;	/* the handshake, and everything after it, is ciphertext */
			count(L7_CNT_TLS_CIPHERTEXT);
			return 0;
		}
	}
	event_submit(&out, got);
	return 0;
}

#ifdef L7_COMPAT
/* Exit of a syscall whose entry program stashed its arguments. */
static __always_inline int on_data_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_args args;

	if (!unstash(id, &args))
		return 0;
	if (args.kind != L7_DATA_IN && args.kind != L7_DATA_OUT)
		return 0;	/* stash left by a syscall whose exit we missed */
	/* A write starts a message when it is called (on loopback the send itself may run the
	 * receiver first); a read has the message when it returns. */
	return data_exit(&args, id, ret, args.kind == L7_DATA_OUT ? args.enter_ns
								  : bpf_ktime_get_ns());
}
#endif

#ifndef L7_COMPAT
/* --- Fast build: data where the socket layer reports it -------------------------------
 *
 * The compat build runs two programs per read or write: the entry program finds the socket
 * and stashes the arguments, the exit program takes them back. Here the BTF tracepoints
 * sock:sock_send_length and sock:sock_recv_length, which fire in sock_sendmsg/sock_recvmsg as
 * each send or receive returns, hand over the struct sock itself:
 *   - nothing runs for syscalls that do not touch a socket (a node's file I/O, epoll,
 *     futexes: a program on raw_syscalls:sys_exit ran for every one of them);
 *   - no fd-table walk to find the socket;
 *   - the syscall's arguments (fd, buffer, iovecs, msghdr) are still in the task's saved
 *     registers, so there is no entry program and no stash.
 * The price: a send's timestamp is when it returned, not when it was called. */
#if defined(__TARGET_ARCH_x86)
#define KS_NR_read	0
#define KS_NR_write	1
#define KS_NR_readv	19
#define KS_NR_writev	20
#define KS_NR_sendto	44
#define KS_NR_recvfrom	45
#define KS_NR_sendmsg	46
#define KS_NR_recvmsg	47
#define KS_NR_recvmmsg	299
#define KS_NR_sendmmsg	307
#define TS_COMPAT	0x0002	/* thread_info.status: inside a 32-bit (ia32) syscall */
#define sc_nr(regs)	((regs)->orig_ax)
#define sc_arg0(regs)	((regs)->di)
#define sc_arg1(regs)	((regs)->si)
#define sc_arg2(regs)	((regs)->dx)
#define sc_arg3(regs)	((regs)->r10)
#define sc_arg4(regs)	((regs)->r8)
/* ia32 syscalls have numbers of their own (3 is close there); x32 ones carry bit 30 and
 * match no case below. */
#define sc_native(regs)	(!(bpf_get_current_task_btf()->thread_info.status & TS_COMPAT))
#elif defined(__TARGET_ARCH_arm64)
#define KS_NR_read	63
#define KS_NR_write	64
#define KS_NR_readv	65
#define KS_NR_writev	66
#define KS_NR_sendto	206
#define KS_NR_recvfrom	207
#define KS_NR_sendmsg	211
#define KS_NR_recvmsg	212
#define KS_NR_recvmmsg	243
#define KS_NR_sendmmsg	269
#define PSR_MODE32_BIT	0x10
#define sc_nr(regs)	((regs)->syscallno)
#define sc_arg0(regs)	((regs)->orig_x0)	/* x0 holds the return value by now */
#define sc_arg1(regs)	((regs)->regs[1])
#define sc_arg2(regs)	((regs)->regs[2])
#define sc_arg3(regs)	((regs)->regs[3])
#define sc_arg4(regs)	((regs)->regs[4])
#define sc_native(regs)	(!((regs)->pstate & PSR_MODE32_BIT))
#else
#error "fast build: syscall numbers and registers for this architecture are missing"
#endif

#define PF_KTHREAD	0x00200000	/* task_struct.flags: a kernel thread */

/* sendmmsg/recvmmsg hand the socket layer one datagram after another, and the tracepoints
 * do not say which: count them per thread. A call ends after vlen datagrams or at its first
 * failure (any failed UDP send or receive of the thread ends it: a thread is in one syscall
 * at a time). Not seen: a call that ends early without a failure reaching the socket layer
 * (recvmmsg's timeout running out, a fault reading the array): the thread's next call with
 * the same array would start counting where that one stopped. */
static __always_inline __s64 mmsg_index(__u64 vec, __u32 vlen)
{
	struct l7_mmsg_at *at = bpf_task_storage_get(&mmsg_at, bpf_get_current_task_btf(), 0,
						     BPF_LOCAL_STORAGE_GET_F_CREATE);

	if (!at) {
		count(L7_CNT_INFLIGHT_FULL);
		return -1;
	}
	if (at->vec != vec || at->next >= at->vlen) {
		at->vec = vec;
		at->vlen = vlen;
		at->next = 0;
	}
	return at->next++;
}

static __always_inline void mmsg_end(void)
{
	struct l7_mmsg_at *at = bpf_task_storage_get(&mmsg_at, bpf_get_current_task_btf(), 0, 0);

	if (at)
		at->next = at->vlen;
}

/* One send (send == true) or receive on sk returned ret, inside the current task's syscall.
 * Cheapest tests first: every socket operation on the node comes here (AF_UNIX, netlink, and
 * the EAGAIN reads of every event loop). */
static __always_inline int sock_data(struct sock *sk, long ret, bool send)
{
	struct task_struct *task;
	struct pt_regs *regs;
	struct user_msghdr msg;
	enum l7_kind kind;
	__u64 id, buf = 0, len = 0, name = 0, msgp = 0, mmsgv = 0;
	__u32 iovcnt = 0, vlen = 0;
	__u16 family, proto;
	__s64 at;

	if (filter_all)
		return 0;
	if (ret <= 0 && ret != -EPIPE && ret != -ECONNRESET) {
		if (sk->sk_protocol == IPPROTO_UDP)
			mmsg_end();
		return 0;
	}
	family = sk->__sk_common.skc_family;
	proto = sk->sk_protocol;
	if ((family != AF_INET && family != AF_INET6) ||
	    (proto != IPPROTO_TCP && proto != IPPROTO_UDP))
		return 0;	/* AF_UNIX, netlink, raw: not TCP or UDP over IP */
	/* Sockets the kernel opened for itself (NFS, iSCSI, ...) are used inside some other
	 * task's syscall: the saved registers are not about them. */
	if (BPF_CORE_READ_BITFIELD(sk, sk_kern_sock))
		return 0;
	task = bpf_get_current_task_btf();
	if (task->flags & PF_KTHREAD)
		return 0;
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	/* Which syscall: sendfile, splice and io_uring reach the socket layer too, with
	 * arguments of another shape: not these. */
	switch (sc_nr(regs)) {
	case KS_NR_read:	/* read(fd, buf, count) */
		kind = L7_DATA_IN;
		buf = sc_arg1(regs);
		break;
	case KS_NR_write:	/* write(fd, buf, count) */
		kind = L7_DATA_OUT;
		buf = sc_arg1(regs);
		len = sc_arg2(regs);
		break;
	case KS_NR_readv:	/* readv(fd, iov, iovcnt) */
		kind = L7_DATA_IN;
		buf = sc_arg1(regs);
		iovcnt = sc_arg2(regs);
		break;
	case KS_NR_writev:
		kind = L7_DATA_OUT;
		buf = sc_arg1(regs);
		iovcnt = sc_arg2(regs);
		break;
	case KS_NR_sendto:	/* sendto(fd, buf, len, flags, dest_addr, addrlen) */
		kind = L7_DATA_OUT;
		buf = sc_arg1(regs);
		len = sc_arg2(regs);
		name = sc_arg4(regs);
		break;
	case KS_NR_recvfrom:	/* recvfrom(fd, buf, len, flags, src_addr, addrlen) */
		/* MSG_PEEK leaves the data queued: it will be read again. */
		if (sc_arg3(regs) & MSG_PEEK)
			return 0;
		kind = L7_DATA_IN;
		buf = sc_arg1(regs);
		name = sc_arg4(regs);
		break;
	case KS_NR_sendmsg:	/* sendmsg(fd, msg, flags) */
		kind = L7_DATA_OUT;
		msgp = sc_arg1(regs);
		break;
	case KS_NR_recvmsg:
		if (sc_arg2(regs) & MSG_PEEK)
			return 0;
		kind = L7_DATA_IN;
		msgp = sc_arg1(regs);
		break;
	case KS_NR_sendmmsg:	/* sendmmsg(fd, vec, vlen, flags) */
		kind = L7_DATA_OUT;
		mmsgv = sc_arg1(regs);
		vlen = sc_arg2(regs);
		break;
	case KS_NR_recvmmsg:	/* recvmmsg(fd, vec, vlen, flags, timeout) */
		if (sc_arg3(regs) & MSG_PEEK)
			return 0;
		kind = L7_DATA_IN;
		mmsgv = sc_arg1(regs);
		vlen = sc_arg2(regs);
		break;
	default:
		return 0;
	}
	if (mmsgv && proto != IPPROTO_UDP)
		return 0;	/* UDP only (the glibc resolver sends A and AAAA with one sendmmsg) */
	if ((kind == L7_DATA_OUT) != send)
		return 0;	/* the socket layer and the syscall disagree: not this socket's call */
	if (ret <= 0 && !send_failed_dead(kind, ret))
		return 0;
	if (!sc_native(regs))
		return 0;
	id = bpf_get_current_pid_tgid();
	if (!traced(id))
		return 0;
	if (proto == IPPROTO_TCP && inside_tls_call(id, sk))
		return 0;
	if (mmsgv) {
		at = mmsg_index(mmsgv, vlen);
		if (at < 0 || at >= L7_MAX_MMSG_VLEN)
			return 0;
		msgp = mmsgv + at * sizeof(struct mmsghdr);	/* starts with its user_msghdr */
	}
	if (msgp) {
		if (bpf_probe_read_user(&msg, sizeof(msg), (const void *)msgp))
			return 0;
		buf = (__u64)msg.msg_iov;
		iovcnt = msg.msg_iovlen;
		name = (__u64)msg.msg_name;
	}
	struct l7_args args = {
		.kind = kind, .fd = sc_arg0(regs), .sk = (__u64)sk, .buf = buf, .len = len,
		.iovcnt = iovcnt, .name = name, .transport = proto,
		.cookie = proto == IPPROTO_UDP ? bpf_get_socket_cookie(sk) : 0,
	};
	return data_exit(&args, id, ret, bpf_ktime_get_ns());
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(sock_send_data, struct sock *sk, int ret, int flags)
{
	return sock_data(sk, ret, true);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(sock_recv_data, struct sock *sk, int ret, int flags)
{
	return sock_data(sk, ret, false);
}

/* --- Fast build: connections where TCP reports them, no syscall tracepoints --------------
 *
 * With any syscalls:* or raw_syscalls:* tracepoint attached, every syscall of every task on
 * the node takes the kernel's tracing slow path (bench/syscall_tax: a process doing file I/O
 * keeps 0.87 of its syscall rate with one no-op program on sys_enter_close). So:
 *   opened   inet_sock_set_state CLOSE -> SYN_SENT runs inside connect(), in the caller (the
 *            process filter applies); LISTEN -> SYN_RECV creates an accepted connection's
 *            socket, in softirq (no process yet). Either gives the socket its entry in conns
 *            with its role; the CONNECT or ACCEPT event goes out with the connection's first
 *            data (conn_own), when its process and local port are known.
 *   closed   tcp_destroy_sock: the last fd is closed and TCP is done with the socket, so no
 *            data can follow. A connection that never moved data sends nothing.
 *   UDP      a received datagram's sender comes from the cgroup recvmsg hooks; a socket's
 *            release (cgroup sock_release) closes its latest flow. Both attach at the root
 *            of the cgroup v2 hierarchy.
 */
static __always_inline void conn_pending(const struct sock *sk, enum l7_role role,
					 enum l7_kind opened)
{
	struct l7_conn conn = {};
	__u64 key = (__u64)sk;

	conn.conn_id = __sync_fetch_and_add(&next_conn_id, 1) + 1;
	conn.role = role;
	conn.transport = L7_TCP;
	conn.opened = opened;
	conn.opened_ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&conns, &key, &conn, BPF_ANY))
		count(L7_CNT_CONN_TABLE_FULL);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tcp_state, const struct sock *sk, int oldstate, int newstate)
{
	if (filter_all || sk->sk_protocol != IPPROTO_TCP)
		return 0;
	if (newstate == TCP_SYN_SENT) {
		if ((bpf_get_current_task_btf()->flags & PF_KTHREAD) ||
		    BPF_CORE_READ_BITFIELD(sk, sk_kern_sock) ||
		    !traced(bpf_get_current_pid_tgid()))
			return 0;
		conn_pending(sk, L7_ROLE_CLIENT, L7_CONNECT);
	} else if (newstate == TCP_SYN_RECV && oldstate == TCP_LISTEN) {
		conn_pending(sk, L7_ROLE_SERVER, L7_ACCEPT);
	}
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(tcp_destroyed, struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct l7_conn *conn;
	struct l7_out out;
	struct l7_event *ev;

	if (filter_all)
		return 0;
	conn = bpf_map_lookup_elem(&conns, &key);
	if (!conn)
		return 0;
	if (conn->owned) {
		ev = event_start(&out, 0, L7_CLOSE, conn, -1, 0, (__u64)conn->tgid << 32,
				 bpf_ktime_get_ns());
		if (ev) {
			__builtin_memcpy(ev->comm, conn->comm, L7_COMM_LEN);
			tcp_health(ev, key);	/* the batch's last word on the connection's health */
			event_submit(&out, 0);
		}
	}
	bpf_map_delete_elem(&conns, &key);
	return 0;
}

/* recvfrom()/recvmsg() asked for the sender's address: the kernel shows it to this hook just
 * before the socket layer returns (sock_recv_data then takes it). Must return 1: allow. */
static __always_inline int udp_recv_from(struct bpf_sock_addr *ctx, __u8 family)
{
	struct l7_udp_src src = {.family = family};
	__u64 id = bpf_get_current_pid_tgid();
	struct bpf_sock *sk = ctx->sk;
	__u32 word;

	if (filter_all || !sk || !traced(id))
		return 1;
	src.lport = sk->src_port;
	src.port = bpf_ntohs(ctx->user_port);
	if (family == AF_INET) {
		word = ctx->user_ip4;
		__builtin_memcpy(src.addr, &word, 4);
	} else {	/* spelled out: a loop, even unrolled, moves the ctx pointer (verifier: EACCES) */
		word = ctx->user_ip6[0];
		__builtin_memcpy(src.addr, &word, 4);
		word = ctx->user_ip6[1];
		__builtin_memcpy(src.addr + 4, &word, 4);
		word = ctx->user_ip6[2];
		__builtin_memcpy(src.addr + 8, &word, 4);
		word = ctx->user_ip6[3];
		__builtin_memcpy(src.addr + 12, &word, 4);
	}
	bpf_map_update_elem(&udp_src, &id, &src, BPF_ANY);
	return 1;
}

SEC("cgroup/recvmsg4")
int udp_recvmsg4(struct bpf_sock_addr *ctx) { return udp_recv_from(ctx, AF_INET); }
SEC("cgroup/recvmsg6")
int udp_recvmsg6(struct bpf_sock_addr *ctx) { return udp_recv_from(ctx, AF_INET6); }

/* The last reference to a UDP socket is gone: its latest flow (a connected socket's only
 * one) is closed; a server's other flows are expired by the stream worker. */
SEC("cgroup/sock_release")
int udp_release(struct bpf_sock *ctx)
{
	__u64 cookie, id = bpf_get_current_pid_tgid();
	struct l7_flow_key *flow;
	struct l7_conn *conn;
	struct l7_out out;
	struct l7_event *ev;

	if (filter_all || ctx->protocol != IPPROTO_UDP)
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	flow = bpf_map_lookup_elem(&udp_last_flow, &cookie);
	if (!flow)
		return 1;
	conn = bpf_map_lookup_elem(&udp_flows, flow);
	if (conn) {
		ev = event_start(&out, 0, L7_CLOSE, conn, -1, 0, id, bpf_ktime_get_ns());
		if (ev)
			event_submit(&out, 0);
		bpf_map_delete_elem(&udp_flows, flow);
	}
	bpf_map_delete_elem(&udp_last_flow, &cookie);
	return 1;
}
#endif /* !L7_COMPAT */

/* --- kubesight's own processes, from their first instruction ------------------------------
 *
 * The user side excludes what its pid files name, seconds after a process starts. These set
 * the same bits where a process begins, so a component restarted by an excluded supervisor,
 * or a process named in excluded_comms, sends nothing at all. Raw tracepoints with CO-RE
 * reads, not BTF ones: the compat build runs where tracing programs are refused, and fork,
 * exec and exit are rare enough that the reads' cost does not matter.
 */
static __always_inline void tgid_bit_set(void *bits, __u32 tgid, bool on)
{
	__u64 bit = 1ULL << (tgid % 64), *word = tgid_word(bits, tgid);

	if (!word)
		return;
	if (on)
		__sync_fetch_and_or(word, bit);
	else
		__sync_fetch_and_and(word, ~bit);
}

static __always_inline bool comm_excluded(void)
{
	char comm[L7_COMM_LEN] = {};

	bpf_get_current_comm(comm, sizeof(comm));
	return bpf_map_lookup_elem(&excluded_comms, comm) != NULL;
}

static __always_inline void exclude_from_start(__u32 tgid)
{
	if (!tgid_bit(&excluded_tgids, tgid))
		count(L7_CNT_EXCLUDED_AT_START);
	tgid_bit_set(&excluded_tgids, tgid, true);
	tgid_bit_set(&excluded_trees, tgid, true);
}

/* Runs in the parent; the child has the parent's comm until it calls exec. */
SEC("raw_tp/sched_process_fork")
int BPF_PROG(own_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = BPF_CORE_READ(parent, tgid), tgid = BPF_CORE_READ(child, tgid);

	if (tgid == ptgid)
		return 0;	/* a new thread of the same process */
	if (tgid_bit(&excluded_trees, ptgid) || comm_excluded())
		exclude_from_start(tgid);
	return 0;
}

/* Runs in the process itself, under its new name. */
SEC("raw_tp/sched_process_exec")
int BPF_PROG(own_exec, struct task_struct *p)
{
	if (comm_excluded())
		exclude_from_start(BPF_CORE_READ(p, tgid));
	return 0;
}

/* The user side's exclusions, run with BPF_PROG_TEST_RUN, never attached: atomic against the
 * hooks here, where a map update from user space would write a whole word back over a bit
 * one of them set meanwhile. set and clear: 1 excluded_tgids, 2 excluded_trees. */
SEC("raw_tp")
int BPF_PROG(own_update, __u64 tgid, __u64 set, __u64 clear)
{
	if (set & 1)
		tgid_bit_set(&excluded_tgids, tgid, true);
	if (set & 2)
		tgid_bit_set(&excluded_trees, tgid, true);
	if (clear & 1)
		tgid_bit_set(&excluded_tgids, tgid, false);
	if (clear & 2)
		tgid_bit_set(&excluded_trees, tgid, false);
	return 0;
}

/* The last thread of a process is gone: its pid may go to a process that is not ours (and
 * one that may use no TLS: its syscalls need not ask for a TLS call). */
SEC("raw_tp/sched_process_exit")
int BPF_PROG(own_exit, struct task_struct *p)
{
	__u32 tgid = BPF_CORE_READ(p, tgid);

	if (BPF_CORE_READ(p, signal, live.counter))
		return 0;	/* other threads live on */
	if (tgid_bit(&excluded_tgids, tgid))
		tgid_bit_set(&excluded_tgids, tgid, false);
	if (tgid_bit(&excluded_trees, tgid))
		tgid_bit_set(&excluded_trees, tgid, false);
	if (tgid_bit(&tls_tgids, tgid))	/* the next process with this pid may use no TLS */
		tgid_bit_set(&tls_tgids, tgid, false);
	return 0;
}

/* --- TLS library (uprobes) -------------------------------------------------------------- */

static __always_inline int tls_enter(enum l7_kind kind, __u64 ssl, __u64 buf, __u64 nbytes)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_tls_call call = {
		.ssl = ssl, .buf = buf, .nbytes = nbytes, .kind = kind,
		.enter_ns = bpf_ktime_get_ns(),
	};
	__u64 *sk;

	__u64 bit = 1ULL << ((id >> 32) % 64), *word;

	if (!traced(id))
		return 0;
	word = tgid_word(&tls_tgids, id >> 32);
	if (word && !(*word & bit))
		__sync_fetch_and_or(word, bit);	/* its syscalls now check for a TLS call */
	sk = bpf_map_lookup_elem(&tls_sockets, &ssl);
	if (sk)
		call.sk = *sk;
	if (bpf_map_update_elem(&tls_calls, &id, &call, BPF_ANY))
		count(L7_CNT_INFLIGHT_FULL);
	return 0;
}

/* ret: bytes moved (SSL_read/SSL_write) or 1/0 (_ex forms, count in *nbytes). */
static __always_inline int tls_exit(long ret, bool ex)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn fresh = {}, *conn;
	struct l7_tls_call call, *found;
	struct l7_out out;
	struct l7_event *ev;
	__u64 moved = 0, want, got;

	found = bpf_map_lookup_elem(&tls_calls, &id);
	if (!found)
		return 0;
	call = *found;
	bpf_map_delete_elem(&tls_calls, &id);
	if (call.sk)
		bpf_map_update_elem(&tls_sockets, &call.ssl, &call.sk, BPF_ANY);
	if (ex) {
		if (ret != 1 || !call.nbytes ||
		    bpf_probe_read_user(&moved, sizeof(moved), (const void *)call.nbytes))
			return 0;
	} else if (ret > 0) {
		moved = ret;
	}
	if (!moved)
		return 0;	/* WANT_READ/WANT_WRITE or an error: nothing moved */
	if (!call.sk) {
		count(L7_CNT_TLS_NO_SOCKET);
		return 0;
	}
	conn = bpf_map_lookup_elem(&conns, &call.sk);
	if (!conn) {
		conn_new(&fresh, (struct sock *)call.sk, L7_ROLE_UNKNOWN);
		conn = bpf_map_lookup_elem(&conns, &call.sk);
	}
	if (conn) {
		conn->tls = 1;
#ifndef L7_COMPAT
		if (!conn->owned)
			conn_own(conn, call.sk, id, -1);
#endif
		fresh = *conn;
	}
	want = capture_len(moved);
	ev = event_start(&out, want, call.kind, &fresh, -1, moved, id,
			 call.kind == L7_DATA_OUT ? call.enter_ns : bpf_ktime_get_ns());
	if (!ev)
		return 0;
	ev->flags = L7_FLAG_TLS;
	tcp_health(ev, call.sk);
	got = copy_message(&out, call.buf, 0, want);
	event_submit(&out, got);
	return 0;
}

/* int SSL_write(SSL *ssl, const void *buf, int num); int SSL_read(SSL *, void *, int);
 * int SSL_write_ex(SSL *, const void *, size_t num, size_t *written); SSL_read_ex alike. */
SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, void *buf)
{ return tls_enter(L7_DATA_OUT, (__u64)ssl, (__u64)buf, 0); }
SEC("uretprobe")
int BPF_KRETPROBE(ssl_write_exit, int ret) { return tls_exit(ret, false); }

SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf)
{ return tls_enter(L7_DATA_IN, (__u64)ssl, (__u64)buf, 0); }
SEC("uretprobe")
int BPF_KRETPROBE(ssl_read_exit, int ret) { return tls_exit(ret, false); }

SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, void *buf, __u64 num, void *written)
{ return tls_enter(L7_DATA_OUT, (__u64)ssl, (__u64)buf, (__u64)written); }
SEC("uretprobe")
int BPF_KRETPROBE(ssl_write_ex_exit, int ret) { return tls_exit(ret, true); }

SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, __u64 num, void *readbytes)
{ return tls_enter(L7_DATA_IN, (__u64)ssl, (__u64)buf, (__u64)readbytes); }
SEC("uretprobe")
int BPF_KRETPROBE(ssl_read_ex_exit, int ret) { return tls_exit(ret, true); }

#ifdef L7_COMPAT	/* connections from syscalls; the fast build: tcp_state, tcp_destroyed */
static __always_inline int on_connect_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn conn = {};
	struct l7_args args;
	struct l7_out out;
	struct l7_event *ev;

	/* Non-blocking connect returns -EINPROGRESS with addresses already set on the sock. */
	if (!unstash(id, &args) || args.kind != L7_CONNECT || (ret != 0 && ret != -EINPROGRESS))
		return 0;
	conn_new(&conn, (struct sock *)args.sk, L7_ROLE_CLIENT);
	ev = event_start(&out, 0, L7_CONNECT, &conn, args.fd, ret, id, bpf_ktime_get_ns());
	if (ev)
		event_submit(&out, 0);
	return 0;
}

static __always_inline int on_accept_enter(void)
{
	__u64 id = bpf_get_current_pid_tgid();

	/* The new fd is known only at exit; stash just to remember the filter passed. */
	if (traced(id))
		stash(id, L7_ACCEPT, -1, NULL, 0, 0, 0, L7_TCP, 0, 0);
	return 0;
}

static __always_inline int on_accept_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn conn = {};
	struct l7_args args;
	struct l7_out out;
	struct l7_event *ev;
	struct sock *sk;

	if (!unstash(id, &args) || args.kind != L7_ACCEPT || ret < 0)
		return 0;
	sk = tcp_sock_of_fd(ret);
	if (!sk)
		return 0;
	conn_new(&conn, sk, L7_ROLE_SERVER);
	ev = event_start(&out, 0, L7_ACCEPT, &conn, ret, ret, id, bpf_ktime_get_ns());
	if (ev) {
		tcp_health(ev, (__u64)sk);	/* the handshake gave the first RTT sample */
		event_submit(&out, 0);
	}
	return 0;
}

/* Kernels before 6.13 count a file's references in f_count (atomic_long_t). */
struct file___f_count {
	atomic_long_t f_count;
} __attribute__((preserve_access_index));

/* Whether another fd (another process after fork, or a dup) still holds this fd's file: then
 * close() does not end the connection, the last close does. */
static __always_inline bool file_shared(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;

	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file)
		return false;
	if (bpf_core_field_exists(file->f_ref))	/* file_ref_t: references - 1 */
		return BPF_CORE_READ(file, f_ref.refcnt.counter) > 0;
	return BPF_CORE_READ((struct file___f_count *)file, f_count.counter) > 1;
}

/* Emitted at entry: whether close() succeeds does not matter, the fd is gone either way. */
static __always_inline int on_close_enter(int fd)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn *conn;
	struct l7_out out;
	struct l7_event *ev;
	struct sock *sk;
	__u64 key;

	struct l7_flow_key *flow;
	__u8 transport = 0;

	if (!traced(id))
		return 0;
	sk = inet_sock_of_fd(fd, &transport);
	if (!sk)
		return 0;
	key = (__u64)sk;
	if (transport == L7_UDP) {
		/* A UDP socket closes its latest flow (a connected socket's only one). */
		flow = bpf_map_lookup_elem(&udp_last_flow, &key);
		if (!flow)
			return 0;
		conn = bpf_map_lookup_elem(&udp_flows, flow);
		if (conn) {
			ev = event_start(&out, 0, L7_CLOSE, conn, fd, 0, id, bpf_ktime_get_ns());
			if (ev)
				event_submit(&out, 0);
			bpf_map_delete_elem(&udp_flows, flow);
		}
		bpf_map_delete_elem(&udp_last_flow, &key);
		return 0;
	}
	conn = bpf_map_lookup_elem(&conns, &key);
	if (!conn)
		return 0;	/* never saw data on it: nothing to close downstream */
	if (file_shared(fd))
		return 0;	/* a forked child (prefork servers) still serves it */
	ev = event_start(&out, 0, L7_CLOSE, conn, fd, 0, id, bpf_ktime_get_ns());
	if (ev) {
		tcp_health(ev, key);	/* the batch's last word on the connection's health */
		event_submit(&out, 0);
	}
	bpf_map_delete_elem(&conns, &key);
	return 0;
}

/* Entry points: one line each, arguments straight from the syscall ABI. */
#define ENTER struct trace_event_raw_sys_enter
#define EXIT  struct trace_event_raw_sys_exit

/* The fast build: sock_send_data, sock_recv_data, tcp_state, tcp_destroyed and the cgroup
 * hooks instead. */
SEC("tp/syscalls/sys_enter_read")
int enter_read(ENTER *ctx)
{ return on_data_enter(L7_DATA_IN, ctx->args[0], ctx->args[1], 0, 0, 0, 0); }
SEC("tp/syscalls/sys_exit_read")
int exit_read(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_write")
int enter_write(ENTER *ctx)
{ return on_data_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1], 0, ctx->args[2], 0, 0); }
SEC("tp/syscalls/sys_exit_write")
int exit_write(EXIT *ctx) { return on_data_exit(ctx->ret); }

/* readv/writev: args are (fd, iov, iovcnt). */
SEC("tp/syscalls/sys_enter_readv")
int enter_readv(ENTER *ctx)
{ return on_data_enter(L7_DATA_IN, ctx->args[0], ctx->args[1], ctx->args[2], 0, 0, 0); }
SEC("tp/syscalls/sys_exit_readv")
int exit_readv(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_writev")
int enter_writev(ENTER *ctx)
{ return on_data_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1], ctx->args[2], 0, 0, 0); }
SEC("tp/syscalls/sys_exit_writev")
int exit_writev(EXIT *ctx) { return on_data_exit(ctx->ret); }

/* sendto(fd, buf, len, flags, dest_addr, addrlen): dest_addr names a UDP peer. */
SEC("tp/syscalls/sys_enter_sendto")
int enter_sendto(ENTER *ctx)
{
	return on_data_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1], 0, ctx->args[2],
			     ctx->args[4], 0);
}
SEC("tp/syscalls/sys_exit_sendto")
int exit_sendto(EXIT *ctx) { return on_data_exit(ctx->ret); }

/* recvfrom(fd, buf, len, flags, src_addr, addrlen): MSG_PEEK leaves the data queued, it
 * will be read again; src_addr is filled with a UDP peer by the time the syscall returns. */
SEC("tp/syscalls/sys_enter_recvfrom")
int enter_recvfrom(ENTER *ctx)
{
	if (ctx->args[3] & MSG_PEEK)
		return 0;
	return on_data_enter(L7_DATA_IN, ctx->args[0], ctx->args[1], 0, 0, ctx->args[4], 0);
}

SEC("tp/syscalls/sys_enter_sendmsg")
int enter_sendmsg(ENTER *ctx) { return on_msg_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1]); }
SEC("tp/syscalls/sys_exit_sendmsg")
int exit_sendmsg(EXIT *ctx) { return on_data_exit(ctx->ret); }

/* recvmsg(fd, msg, flags): same MSG_PEEK rule as recvfrom. */
SEC("tp/syscalls/sys_enter_recvmsg")
int enter_recvmsg(ENTER *ctx)
{
	if (ctx->args[2] & MSG_PEEK)
		return 0;
	return on_msg_enter(L7_DATA_IN, ctx->args[0], ctx->args[1]);
}

/* Compat build only: a stashed recvfrom/recvmsg is sent when the syscall returns, because
 * only then has the kernel copied the sender's address to src_addr / msg_name. */
SEC("tp/syscalls/sys_exit_recvfrom")
int exit_recvfrom(EXIT *ctx) { return on_data_exit(ctx->ret); }
SEC("tp/syscalls/sys_exit_recvmsg")
int exit_recvmsg(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_connect")
int enter_connect(ENTER *ctx)
{ return on_data_enter(L7_CONNECT, ctx->args[0], 0, 0, 0, 0, 0); }
SEC("tp/syscalls/sys_exit_connect")
int exit_connect(EXIT *ctx) { return on_connect_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_accept")
int enter_accept(ENTER *ctx) { return on_accept_enter(); }
SEC("tp/syscalls/sys_exit_accept")
int exit_accept(EXIT *ctx) { return on_accept_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_accept4")
int enter_accept4(ENTER *ctx) { return on_accept_enter(); }
SEC("tp/syscalls/sys_exit_accept4")
int exit_accept4(EXIT *ctx) { return on_accept_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_close")
int enter_close(ENTER *ctx) { return on_close_enter(ctx->args[0]); }

/* sendmmsg(fd, vec, vlen, flags) / recvmmsg(fd, vec, vlen, flags, timeout): UDP only (the
 * glibc resolver sends its A and AAAA queries with one sendmmsg). */
SEC("tp/syscalls/sys_enter_sendmmsg")
int enter_sendmmsg(ENTER *ctx)
{ return on_data_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1], ctx->args[2], 0, 0, 1); }
SEC("tp/syscalls/sys_exit_sendmmsg")
int exit_sendmmsg(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_recvmmsg")
int enter_recvmmsg(ENTER *ctx)
{
	if (ctx->args[3] & MSG_PEEK)
		return 0;
	return on_data_enter(L7_DATA_IN, ctx->args[0], ctx->args[1], ctx->args[2], 0, 0, 1);
}
SEC("tp/syscalls/sys_exit_recvmmsg")
int exit_recvmmsg(EXIT *ctx) { return on_data_exit(ctx->ret); }
#endif /* L7_COMPAT */
