// SPDX-License-Identifier: GPL-2.0
/* l7: TCP connection and payload events from syscall tracepoints (no kprobes needed).
 *
 * Entry programs decide early and cheaply: filtered process? not a TCP socket? -> return.
 * Otherwise they stash the syscall arguments per thread; exit programs read the return value,
 * copy a bounded payload prefix and submit one event to the ring buffer without a wakeup
 * (the user side polls on a timer; a wakeup per event costs ~5 us here).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
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
	__u64 buf;		/* buffer, or struct iovec array */
	__u64 sk;		/* struct sock * (0 for accept: known only at exit) */
	__u64 enter_ns;		/* when the syscall was entered */
	__u64 len;		/* bytes asked for (plain buffers of write/sendto only) */
	__u32 iovcnt;
	__s32 fd;
	enum l7_kind kind;
	__u32 _pad;
};

/* Identity of one TCP connection, keyed by its struct sock *. */
struct l7_conn {
	__u64 conn_id;
	enum l7_role role;
	__u16 lport;
	__u16 rport;
	__u8  family;
	__u8  _pad[7];
	__u8  laddr[L7_ADDR_LEN];
	__u8  raddr[L7_ADDR_LEN];
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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);	/* a thread killed in a syscall never exits it */
	__uint(max_entries, L7_MAX_INFLIGHT);
	__type(key, __u64);			/* pid_tgid */
	__type(value, struct l7_args);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_MAX_CONNECTIONS);
	__type(key, __u64);			/* struct sock * */
	__type(value, struct l7_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L7_MAX_EXCLUDED);
	__type(key, __u32);			/* tgid */
	__type(value, __u8);
} excluded_tgids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, L7_CNT__MAX);
	__type(key, __u32);			/* enum l7_counter (array keys must be plain ints) */
	__type(value, __u64);
} counters SEC(".maps");

/* Events are too big for the 512-byte stack: build them here. */
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
	struct l7_event *event;
} l7_btf_anchor __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u64 *val = bpf_map_lookup_elem(&counters, &idx);

	if (val)
		*val += 1;	/* per-CPU slot: no atomic needed */
}

/* First filter of every entry program: two loads and at most one hash lookup. */
static __always_inline bool traced(__u64 pid_tgid)
{
	__u32 tgid = pid_tgid >> 32;

	if (filter_all)
		return false;
	return !bpf_map_lookup_elem(&excluded_tgids, &tgid);
}

/* fd -> struct sock * if it is a TCP socket over IPv4/IPv6, else NULL (no kprobes: walk the
 * fd table with CO-RE). */
static __always_inline struct sock *tcp_sock_of_fd(int fd)
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
	/* AF_UNIX and UDP sockets pass the S_IFSOCK test too. */
	if ((family != AF_INET && family != AF_INET6) || proto != IPPROTO_TCP) {
		count(L7_CNT_SKIPPED_NOT_TCP);
		return NULL;
	}
	return sk;
}

/* Stash what the exit program needs, keyed by thread. */
static __always_inline void stash(__u64 pid_tgid, enum l7_kind kind, int fd, struct sock *sk,
				  __u64 buf, __u32 iovcnt, __u64 len)
{
	struct l7_args args = {
		.buf = buf, .sk = (__u64)sk, .iovcnt = iovcnt, .fd = fd, .kind = kind,
		.enter_ns = bpf_ktime_get_ns(), .len = len,
	};

	if (bpf_map_update_elem(&inflight, &pid_tgid, &args, BPF_ANY))
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

/* Assign a new connection id and record addresses; skc_dport is network order, skc_num not. */
static __always_inline void conn_new(struct l7_conn *conn, struct sock *sk, enum l7_role role)
{
	__u64 key = (__u64)sk;

	conn->conn_id = __sync_fetch_and_add(&next_conn_id, 1) + 1;
	conn->role = role;
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
	if (bpf_map_update_elem(&conns, &key, conn, BPF_ANY))
		count(L7_CNT_CONN_TABLE_FULL);
}

/* Fill the header of the per-CPU scratch event; payload is added by the caller. */
static __always_inline struct l7_event *event_start(enum l7_kind kind, const struct l7_conn *conn,
						     int fd, __s64 size, __u64 pid_tgid, __u64 ts_ns)
{
	__u32 zero = 0;
	struct l7_scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	struct l7_event *ev;

	if (!s)
		return NULL;
	ev = &s->ev;
	ev->kind = kind;
	ev->role = conn->role;
	ev->family = conn->family;
	ev->_pad0 = 0;
	ev->lport = conn->lport;
	ev->rport = conn->rport;
	ev->tgid = pid_tgid >> 32;
	ev->fd = fd;
	ev->conn_id = conn->conn_id;
	ev->ts_ns = ts_ns;
	ev->size = size;
	ev->cap_len = 0;
	ev->_pad1 = 0;
	__builtin_memcpy(ev->laddr, conn->laddr, L7_ADDR_LEN);
	__builtin_memcpy(ev->raddr, conn->raddr, L7_ADDR_LEN);
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	return ev;
}

/* Submit header + cap_len bytes of payload; no wakeup, the reader polls on a timer. */
static __always_inline void event_submit(struct l7_event *ev, __u64 cap_len)
{
	if (cap_len > L7_CAPTURE_MAX)
		cap_len = L7_CAPTURE_MAX;
	ev->cap_len = cap_len;
	if (bpf_ringbuf_output(&events, ev, offsetof(struct l7_event, payload) + cap_len,
			       BPF_RB_NO_WAKEUP))
		count(L7_CNT_RINGBUF_DROPS);
	else
		count(L7_CNT_EVENTS);
}

/* Copy len user bytes to payload[off..]; returns bytes copied (0 on fault). Lengths are u64
 * and clamped explicitly: clang 14 otherwise loses the bound ("R2 min value is negative"). */
static __always_inline __u64 copy_payload(struct l7_event *ev, __u64 off, __u64 src, __u64 len)
{
	if (off >= L7_CAPTURE_MAX)
		return 0;
	if (len > L7_CAPTURE_MAX)
		len = L7_CAPTURE_MAX;
	if (bpf_probe_read_user(ev->payload + off, len, (const void *)src)) {
		count(L7_CNT_PAYLOAD_READ_FAILED);
		return 0;
	}
	return len;
}

/* Walk up to L7_MAX_IOVECS iovecs until want bytes are copied. */
static __always_inline __u64 copy_iovecs(struct l7_event *ev, __u64 iovp, __u32 iovcnt,
					 __u64 want)
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
		if (copy_payload(ev, off, (__u64)iov.iov_base, n) != n)
			break;
		off += n;
	}
	return off;
}

static __always_inline int on_data_enter(enum l7_kind kind, int fd, __u64 buf, __u32 iovcnt,
					 __u64 len)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct sock *sk;

	if (!traced(id))
		return 0;
	sk = tcp_sock_of_fd(fd);
	if (!sk)
		return 0;
	stash(id, kind, fd, sk, buf, iovcnt, len);
	return 0;
}

/* sendmsg/recvmsg: the iovec array lives in the user's msghdr. */
static __always_inline int on_msg_enter(enum l7_kind kind, int fd, __u64 msgp)
{
	struct user_msghdr msg;

	if (bpf_probe_read_user(&msg, sizeof(msg), (const void *)msgp))
		return 0;
	return on_data_enter(kind, fd, (__u64)msg.msg_iov, msg.msg_iovlen, 0);
}

static __always_inline int on_data_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn fresh = {}, *conn;
	struct l7_args args;
	struct l7_event *ev;
	__u64 cap, want, got, sent;
	bool dead;

	if (!unstash(id, &args))
		return 0;
	if (args.kind != L7_DATA_IN && args.kind != L7_DATA_OUT)
		return 0;	/* stash left by a syscall whose exit we missed */
	/* A send that fails because the peer is gone is still what the process answered (a
	 * server logs it as served): report it, size = -errno. EAGAIN etc. are retried later. */
	dead = args.kind == L7_DATA_OUT && (ret == -EPIPE || ret == -ECONNRESET);
	if (ret <= 0 && !dead)
		return 0;
	conn = bpf_map_lookup_elem(&conns, &args.sk);
	if (!conn) {
		/* Open before the probe started: role unknown, identity from now on. */
		conn_new(&fresh, (struct sock *)args.sk, L7_ROLE_UNKNOWN);
		conn = &fresh;
	}
	/* A write starts a message when it is called (on loopback the send itself may run the
	 * receiver first); a read has the message when it returns. */
	ev = event_start(args.kind, conn, args.fd, ret, id,
			 args.kind == L7_DATA_OUT ? args.enter_ns : bpf_ktime_get_ns());
	if (!ev)
		return 0;
	cap = capture_bytes;
	if (cap > L7_CAPTURE_MAX)
		cap = L7_CAPTURE_MAX;
	sent = dead ? (args.iovcnt ? cap : args.len) : (__u64)ret;
	want = sent < cap ? sent : cap;
	if (sent > want)
		count(L7_CNT_TRUNCATED);
	if (args.iovcnt == 0)
		got = copy_payload(ev, 0, args.buf, want);
	else
		got = copy_iovecs(ev, args.buf, args.iovcnt, want);
	event_submit(ev, got);
	return 0;
}

static __always_inline int on_connect_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn conn = {};
	struct l7_args args;
	struct l7_event *ev;

	/* Non-blocking connect returns -EINPROGRESS with addresses already set on the sock. */
	if (!unstash(id, &args) || args.kind != L7_CONNECT || (ret != 0 && ret != -EINPROGRESS))
		return 0;
	conn_new(&conn, (struct sock *)args.sk, L7_ROLE_CLIENT);
	ev = event_start(L7_CONNECT, &conn, args.fd, ret, id, bpf_ktime_get_ns());
	if (ev)
		event_submit(ev, 0);
	return 0;
}

static __always_inline int on_accept_enter(void)
{
	__u64 id = bpf_get_current_pid_tgid();

	/* The new fd is known only at exit; stash just to remember the filter passed. */
	if (traced(id))
		stash(id, L7_ACCEPT, -1, NULL, 0, 0, 0);
	return 0;
}

static __always_inline int on_accept_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn conn = {};
	struct l7_args args;
	struct l7_event *ev;
	struct sock *sk;

	if (!unstash(id, &args) || args.kind != L7_ACCEPT || ret < 0)
		return 0;
	sk = tcp_sock_of_fd(ret);
	if (!sk)
		return 0;
	conn_new(&conn, sk, L7_ROLE_SERVER);
	ev = event_start(L7_ACCEPT, &conn, ret, ret, id, bpf_ktime_get_ns());
	if (ev)
		event_submit(ev, 0);
	return 0;
}

/* Emitted at entry: whether close() succeeds does not matter, the fd is gone either way. */
static __always_inline int on_close_enter(int fd)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn *conn;
	struct l7_event *ev;
	struct sock *sk;
	__u64 key;

	if (!traced(id))
		return 0;
	sk = tcp_sock_of_fd(fd);
	if (!sk)
		return 0;
	key = (__u64)sk;
	conn = bpf_map_lookup_elem(&conns, &key);
	if (!conn)
		return 0;	/* never saw data on it: nothing to close downstream */
	ev = event_start(L7_CLOSE, conn, fd, 0, id, bpf_ktime_get_ns());
	if (ev)
		event_submit(ev, 0);
	bpf_map_delete_elem(&conns, &key);
	return 0;
}

/* Entry points: one line each, arguments straight from the syscall ABI. */
#define ENTER struct trace_event_raw_sys_enter
#define EXIT  struct trace_event_raw_sys_exit

SEC("tp/syscalls/sys_enter_read")
int enter_read(ENTER *ctx) { return on_data_enter(L7_DATA_IN, ctx->args[0], ctx->args[1], 0, 0); }
SEC("tp/syscalls/sys_exit_read")
int exit_read(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_write")
int enter_write(ENTER *ctx)
{ return on_data_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1], 0, ctx->args[2]); }
SEC("tp/syscalls/sys_exit_write")
int exit_write(EXIT *ctx) { return on_data_exit(ctx->ret); }

/* readv/writev: args are (fd, iov, iovcnt). */
SEC("tp/syscalls/sys_enter_readv")
int enter_readv(ENTER *ctx)
{ return on_data_enter(L7_DATA_IN, ctx->args[0], ctx->args[1], ctx->args[2], 0); }
SEC("tp/syscalls/sys_exit_readv")
int exit_readv(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_writev")
int enter_writev(ENTER *ctx)
{ return on_data_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1], ctx->args[2], 0); }
SEC("tp/syscalls/sys_exit_writev")
int exit_writev(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_sendto")
int enter_sendto(ENTER *ctx)
{ return on_data_enter(L7_DATA_OUT, ctx->args[0], ctx->args[1], 0, ctx->args[2]); }
SEC("tp/syscalls/sys_exit_sendto")
int exit_sendto(EXIT *ctx) { return on_data_exit(ctx->ret); }

/* recvfrom(fd, buf, len, flags, ...): MSG_PEEK leaves the data queued, it will be read again. */
SEC("tp/syscalls/sys_enter_recvfrom")
int enter_recvfrom(ENTER *ctx)
{
	if (ctx->args[3] & MSG_PEEK)
		return 0;
	return on_data_enter(L7_DATA_IN, ctx->args[0], ctx->args[1], 0, 0);
}
SEC("tp/syscalls/sys_exit_recvfrom")
int exit_recvfrom(EXIT *ctx) { return on_data_exit(ctx->ret); }

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
SEC("tp/syscalls/sys_exit_recvmsg")
int exit_recvmsg(EXIT *ctx) { return on_data_exit(ctx->ret); }

SEC("tp/syscalls/sys_enter_connect")
int enter_connect(ENTER *ctx) { return on_data_enter(L7_CONNECT, ctx->args[0], 0, 0, 0); }
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
