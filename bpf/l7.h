/* l7: socket payload and connection events from syscall tracepoints.
 * The only source of the event layout; probe/l7.py is tested against this file's BTF.
 * Includers provide __u8.. (vmlinux.h in BPF, <linux/types.h> in user space). */
#ifndef KUBESIGHT_L7_H
#define KUBESIGHT_L7_H

#define L7_CAPTURE_MAX     8192	/* capture_bytes is clamped to this (per-CPU scratch ≤ 32 KiB) */
#define L7_MAX_IOVECS      32		/* iovecs walked per readv/writev/sendmsg/recvmsg (grpc-core writes 14-22) */
#define L7_MAX_CONNECTIONS 65536	/* LRU: sock -> connection identity */
#define L7_MAX_UDP_FLOWS   16384	/* LRU: (UDP sock, peer) -> flow identity */
#define L7_MAX_MMSG        4		/* compat build: datagrams reported per sendmmsg/recvmmsg */
#define L7_MAX_MMSG_VLEN   1024	/* fast build: the kernel's cap on their vlen (UIO_MAXIOV) */
#define L7_MAX_INFLIGHT    16384	/* threads inside a traced syscall at once */
#define L7_TGID_WORDS      65536	/* per-tgid bitmaps: 64 tgids a word, pid_max <= 4M */
#define L7_MAX_EXCLUDED_COMMS 64	/* process names (comm) never traced */
#define L7_RINGBUF_BYTES   (16 << 20)	/* default; the loader may resize before load */
#define L7_ADDR_LEN        16
#define L7_COMM_LEN        16

enum l7_kind {
	L7_CONNECT  = 1,	/* role client (fast build: sent with the first data, stamped at SYN_SENT) */
	L7_ACCEPT   = 2,	/* role server (fast build: sent with the first data, stamped at SYN_RECV) */
	L7_DATA_OUT = 3,	/* write, writev, sendto, sendmsg, sendmmsg */
	L7_DATA_IN  = 4,	/* read, readv, recvfrom, recvmsg, recvmmsg */
	L7_CLOSE    = 5,	/* last close of a connection seen before (fast build: TCP destroys it) */
};

/* IPPROTO_* values (tested): UDP flows are (socket, peer) pairs, reported for DNS only. */
enum l7_transport {
	L7_TCP = 6,
	L7_UDP = 17,
};

/* Bits of l7_event.flags. */
enum l7_flag {
	L7_FLAG_TLS = 1,	/* plaintext from the TLS library (uprobes), not from a syscall */
};

enum l7_role {
	L7_ROLE_UNKNOWN = 0,	/* connection was open before the probe started */
	L7_ROLE_CLIENT  = 1,
	L7_ROLE_SERVER  = 2,
};

enum l7_counter {
	L7_CNT_EVENTS = 0,		/* events written to the ring buffer */
	L7_CNT_RINGBUF_DROPS,		/* ring buffer full: event lost */
	L7_CNT_TRUNCATED,		/* payload longer than capture_bytes */
	L7_CNT_SKIPPED_NOT_SOCKET,	/* fd is a file, pipe, ... */
	L7_CNT_SKIPPED_NOT_INET,	/* socket is AF_UNIX, raw, ...: not TCP or UDP over IP */
	L7_CNT_INFLIGHT_FULL,		/* per-thread stash full: syscall not traced */
	L7_CNT_CONN_TABLE_FULL,		/* connection identity not stored */
	L7_CNT_PAYLOAD_READ_FAILED,	/* bpf_probe_read_user failed: cap_len shorter */
	L7_CNT_SKIPPED_UDP_NOT_DNS,	/* UDP datagram without a DNS header: not sent */
	L7_CNT_FLOW_TABLE_FULL,		/* UDP flow identity not stored */
	L7_CNT_TLS_CIPHERTEXT,		/* syscall data of a TLS connection: not sent */
	L7_CNT_TLS_NO_SOCKET,		/* TLS call whose socket was never seen: not sent */
	L7_CNT_EXCLUDED_AT_START,	/* process excluded where it began (fork or exec) */
	L7_CNT__MAX,
};

struct l7_event {
	__u8  kind;		/* enum l7_kind */
	__u8  role;		/* enum l7_role */
	__u8  family;		/* AF_INET or AF_INET6 */
	__u8  transport;	/* enum l7_transport */
	__u16 lport;		/* host order */
	__u16 rport;		/* host order */
	__u32 tgid;
	__s32 fd;
	__u64 conn_id;		/* unique per probe instance, never 0 */
	__u64 ts_ns;		/* CLOCK_MONOTONIC at syscall exit (compat build: a send's entry) */
	__s64 size;		/* syscall return: bytes transferred (-EPIPE/-ECONNRESET: send failed) */
	__u32 cap_len;		/* bytes of payload[] that follow the header */
	__u32 flags;		/* enum l7_flag bits */
	__u32 srtt_us;		/* TCP data: the connection's smoothed RTT when the event was made */
	__u32 retrans;		/* TCP data: segments it has retransmitted so far (total_retrans) */
	__u8  laddr[L7_ADDR_LEN];	/* IPv4 in the first 4 bytes, or IPv6 */
	__u8  raddr[L7_ADDR_LEN];
	char  comm[L7_COMM_LEN];
	__u8  payload[L7_CAPTURE_MAX];	/* only cap_len bytes are submitted */
};

#endif /* KUBESIGHT_L7_H */
