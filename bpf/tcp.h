/* tcp: per-connection TCP health aggregated in the kernel, from sock/tcp tracepoints.
 * The only source of the layout; probe/tcp.py is tested against this file's BTF.
 * Names carry a ks_ prefix: vmlinux.h already has TCP_FLAG_SYN and friends.
 * Includers provide __u8.. (vmlinux.h in BPF, <linux/types.h> in user space). */
#ifndef KUBESIGHT_TCP_H
#define KUBESIGHT_TCP_H

#define KS_TCP_MAX_CONNECTIONS 32768	/* LRU: sock -> connection; the loader may resize */
#define KS_TCP_MAX_PEERS       16384	/* LRU: active 4-tuple -> process (same-node peers) */
#define KS_TCP_MAX_LISTENERS   8192	/* (netns, port) -> listening process */
#define KS_TCP_TGID_WORDS      65536	/* excluded tgids, 64 a word (pid_max <= 4M); resized */
#define KS_TCP_RINGBUF_BYTES   (4 << 20)	/* closed connections waiting for the user side */
#define KS_TCP_RTT_SLOTS       32	/* log2 histogram of srtt in µs: slot i holds [2^i, 2^(i+1)) */
#define KS_TCP_ADDR_LEN        16
#define KS_TCP_COMM_LEN        16

enum ks_tcp_kind {
	KS_TCP_CLOSE = 1,	/* the connection reached TCP_CLOSE: its final record */
};

enum ks_tcp_role {
	KS_TCP_ROLE_UNKNOWN = 0,	/* open before the probe started, no listener on its port */
	KS_TCP_ROLE_ACTIVE  = 1,	/* connect(): the client end */
	KS_TCP_ROLE_PASSIVE = 2,	/* accepted from a listener: the server end */
};

/* Bits of ks_tcp_conn.flags. */
enum ks_tcp_flag {
	KS_TCP_F_ESTABLISHED  = 1,	/* reached ESTABLISHED (a failed connect never does) */
	KS_TCP_F_RST_SYN_SENT = 2,	/* a reset arrived in SYN_SENT: connection refused */
	KS_TCP_F_EXCLUDED     = 4,	/* kubesight's own: kept only to ignore its events */
	KS_TCP_F_CLOSED       = 8,	/* reached CLOSE; sent when the socket is destroyed */
	KS_TCP_F_FIN_SENT     = 16,	/* this end closed first or second (FIN_WAIT1/LAST_ACK) */
};

enum ks_tcp_counter {
	KS_TCP_CNT_EVENTS = 0,		/* closed connections written to the ring buffer */
	KS_TCP_CNT_RINGBUF_DROPS,	/* ring buffer full: a closed connection lost */
	KS_TCP_CNT_CONN_TABLE_FULL,	/* connection not stored: its counters are lost */
	KS_TCP_CNT_ADOPTED,		/* connections first seen after they opened */
	KS_TCP_CNT_EXCLUDED,		/* connections of excluded processes, not reported */
	KS_TCP_CNT_RST_SENT_NO_SOCKET,	/* resets answering segments for no socket (closed port) */
	KS_TCP_CNT__MAX,
};

/* One connection: the map value, and (kind = KS_TCP_CLOSE) the ring-buffer record. */
struct ks_tcp_conn {
	__u8  kind;		/* enum ks_tcp_kind; 0 in the map */
	__u8  role;		/* enum ks_tcp_role */
	__u8  family;		/* AF_INET or AF_INET6 */
	__u8  flags;		/* enum ks_tcp_flag bits */
	__u16 lport;		/* host order */
	__u16 rport;
	__u32 tgid;		/* local process: the connecting one, or the listener's owner; 0 unknown */
	__u32 peer_tgid;	/* the other end's process when it runs on this node; 0 unknown */
	__s32 sk_err;		/* socket error at close (ECONNREFUSED, ETIMEDOUT, ...); 0 none */
	__u32 netns;		/* network namespace inode number */
	__u64 conn_id;		/* unique per probe instance, never 0 */
	__u64 opened_ns;	/* CLOCK_MONOTONIC of SYN_SENT/SYN_RECV; 0 if opened before the probe */
	__u64 established_ns;	/* CLOCK_MONOTONIC of ESTABLISHED; 0 if never (or before the probe) */
	__u64 closed_ns;	/* CLOCK_MONOTONIC of CLOSE; records only */
	__u64 bytes_acked;	/* tcp_sock.bytes_acked (sent and acknowledged) since first seen */
	__u64 bytes_received;	/* tcp_sock.bytes_received since first seen */
	__u64 acked_base;	/* tcp_sock.bytes_acked when first seen (1 for an active open: its SYN) */
	__u64 received_base;
	__u64 srtt_sum_us;	/* sum of the srtt samples (one per tcp_probe event) */
	__u32 retransmits;	/* segments retransmitted (total_retrans), SYNs included */
	__u32 resets_sent;
	__u32 resets_received;
	__u32 srtt_last_us;
	__u32 srtt_min_us;
	__u32 srtt_max_us;
	__u32 rtt_hist[KS_TCP_RTT_SLOTS];	/* srtt samples per log2 slot */
	__u8  laddr[KS_TCP_ADDR_LEN];	/* IPv4 in the first 4 bytes, or IPv6 */
	__u8  raddr[KS_TCP_ADDR_LEN];
	char  comm[KS_TCP_COMM_LEN];	/* of tgid */
	char  peer_comm[KS_TCP_COMM_LEN];	/* of peer_tgid */
};

#endif /* KUBESIGHT_TCP_H */
