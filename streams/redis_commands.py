"""Redis command names and key positions: a request's endpoint, method and query text.

A request's endpoint must have bounded cardinality, so it is the command name (upper-cased),
or for container commands the name and a known subcommand (``CLIENT SETNAME``,
``CONFIG GET``); a name Redis does not know becomes ``UNKNOWN`` unless it looks like a module
command (``JSON.GET``, ``FT.SEARCH``).

The query text is the command and at most its first key (``SET user:42``), never a value:
values may be secrets, and so may the arguments of ``AUTH``, ``HELLO ... AUTH``, ``MIGRATE
... AUTH`` or ``CONFIG SET requirepass``. Which argument is the first key comes from this
table, taken from Redis 7.0's ``COMMAND`` reply (first-key positions and subcommands), plus the
few commands added since (7.2, 7.4); a command that is not in it shows no argument.
"""

from __future__ import annotations

import re

MAX_QUERY = 128  # chars of query text per request


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# First key is argv[1].
_KEY_AT_1 = _names("""
append bitcount bitfield bitfield_ro bitpos blmove blpop brpop brpoplpush bzpopmax bzpopmin copy
decr decrby del dump exists expire expireat expiretime geoadd geodist geohash geopos georadius
georadius_ro georadiusbymember georadiusbymember_ro geosearch geosearchstore get getbit getdel
getex getrange getset hdel hexists hget hgetall hincrby hincrbyfloat hkeys hlen hmget hmset
hrandfield hscan hset hsetnx hstrlen hvals incr incrby incrbyfloat lcs lindex linsert llen lmove
lpop lpos lpush lpushx lrange lrem lset ltrim mget move mset msetnx persist pexpire pexpireat
pexpiretime pfadd pfcount pfmerge psetex pttl rename renamenx restore restore-asking rpop
rpoplpush rpush rpushx sadd scard sdiff sdiffstore set setbit setex setnx setrange sinter
sinterstore sismember smembers smismember smove sort sort_ro spop spublish srandmember srem
sscan ssubscribe strlen substr sunion sunionstore sunsubscribe touch ttl type unlink watch xack
xadd xautoclaim xclaim xdel xlen xpending xrange xrevrange xsetid xtrim zadd zcard zcount
zdiffstore zincrby zinterstore zlexcount zmscore zpopmax zpopmin zrandmember zrange zrangebylex
zrangebyscore zrangestore zrank zrem zremrangebylex zremrangebyrank zremrangebyscore zrevrange
zrevrangebylex zrevrangebyscore zrevrank zscan zscore zunionstore
hexpire hexpireat hexpiretime hpersist hpexpire hpexpireat hpexpiretime hpttl httl
""")  # last line: Redis 7.4

# No key shown: keyless commands, and those whose arguments may be secrets (AUTH, HELLO) or
# whose keys have no fixed place (XREAD ... STREAMS key).
_NO_KEY = _names("""
asking auth bgrewriteaof bgsave dbsize debug discard echo exec failover flushall flushdb hello
info keys lastsave lolwut monitor multi pfselftest ping psubscribe psync publish punsubscribe
quit randomkey readonly readwrite replconf replicaof reset role save scan select shutdown
slaveof subscribe swapdb sync time unsubscribe unwatch wait xread xreadgroup
waitaof
""")

# First key at another fixed position.
_KEY_AT = {"bitop": 2, "migrate": 3, "pfdebug": 2}

# Keys follow a numkeys argument at this position: EVAL script numkeys key ...
_NUMKEYS_AT = {
    "eval": 2, "eval_ro": 2, "evalsha": 2, "evalsha_ro": 2, "fcall": 2, "fcall_ro": 2,
    "blmpop": 2, "bzmpop": 2, "lmpop": 1, "zmpop": 1, "sintercard": 1, "zintercard": 1,
    "zdiff": 1, "zinter": 1, "zunion": 1,
}  # fmt: skip


def _container(keyless: str, key_at_2: str = "") -> dict[str, int]:
    return {**dict.fromkeys(keyless.split(), 0), **dict.fromkeys(key_at_2.split(), 2)}


# Container commands: subcommand → position of its first key (0: none shown).
_SUBCOMMANDS: dict[str, dict[str, int]] = {
    "acl": _container("cat deluser dryrun genpass getuser help list load log save setuser users "
                      "whoami"),
    "client": _container("caching getname getredir help id info kill list no-evict pause reply "
                         "setname tracking trackinginfo unblock unpause setinfo no-touch"),
    "cluster": _container("addslots addslotsrange bumpepoch count-failure-reports "
                          "countkeysinslot delslots delslotsrange failover flushslots forget "
                          "getkeysinslot help info keyslot links meet myid nodes replicas "
                          "replicate reset saveconfig set-config-epoch setslot shards slaves "
                          "slots myshardid"),
    "command": _container("count docs getkeys getkeysandflags help info list"),
    "config": _container("get help resetstat rewrite set"),
    "function": _container("delete dump flush help kill list load restore stats"),
    "latency": _container("doctor graph help histogram history latest reset"),
    "memory": _container("doctor help malloc-stats purge stats", "usage"),
    "module": _container("help list load loadex unload"),
    "object": _container("help", "encoding freq idletime refcount"),
    "pubsub": _container("channels help numpat numsub shardchannels shardnumsub"),
    "script": _container("debug exists flush help kill load"),
    "slowlog": _container("get help len reset"),
    "xgroup": _container("help", "create createconsumer delconsumer destroy setid"),
    "xinfo": _container("help", "consumers groups stream"),
}  # "client setinfo", "client no-touch", "cluster myshardid": Redis 7.2

COMMANDS = _KEY_AT_1 | _NO_KEY | _KEY_AT.keys() | _NUMKEYS_AT.keys() | _SUBCOMMANDS.keys()
_MODULE_COMMAND = re.compile(rb"[A-Za-z][A-Za-z0-9_]{0,15}\.[A-Za-z0-9_.]{1,31}")
SUBSCRIBE_FAMILY = frozenset(
    ("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"))

Argv = list[bytes | None]  # the first arguments of a request; None: not captured (a gap)


def _name(word: bytes | None) -> str:
    if word is None:
        return ""
    low = word.lower()
    try:
        text = low.decode("ascii")
    except UnicodeDecodeError:
        return ""
    if text in COMMANDS or _MODULE_COMMAND.fullmatch(low):
        return text
    return ""


def command(argv: Argv) -> str:
    """Endpoint and method of a request: ``GET``, ``CLIENT SETNAME``, ``JSON.GET``,
    ``UNKNOWN``."""
    name = _name(argv[0]) if argv else ""
    if not name:
        return "UNKNOWN"
    subs = _SUBCOMMANDS.get(name)
    if subs is not None and len(argv) > 1 and argv[1] is not None:
        sub = argv[1].lower().decode("latin-1")
        if sub in subs:
            return f"{name} {sub}".upper()
    return name.upper()


def _key_position(name: str, argv: Argv) -> int:
    if name in _KEY_AT_1:
        return 1
    at = _KEY_AT.get(name)
    if at is not None:
        return at
    numkeys = _NUMKEYS_AT.get(name)
    if numkeys is not None and len(argv) > numkeys:
        count = argv[numkeys]
        if count is not None and count.isdigit() and int(count[:9]) > 0:
            return numkeys + 1
        return 0
    subs = _SUBCOMMANDS.get(name)
    if subs is not None and len(argv) > 1 and argv[1] is not None:
        return subs.get(argv[1].lower().decode("latin-1"), 0)
    return 0


def query(argv: Argv) -> str:
    """The command and at most its first key, printable, at most ``MAX_QUERY`` chars."""
    cmd = command(argv)
    name = _name(argv[0]) if argv else ""
    pos = _key_position(name, argv) if name else 0
    key = argv[pos] if 0 < pos < len(argv) else None
    if not key:
        return cmd
    text = f"{cmd} {printable(key)}"
    return text if len(text) <= MAX_QUERY else text[: MAX_QUERY - 1] + "…"


def printable(raw: bytes) -> str:
    """Bytes as text a log line can hold: UTF-8 where valid, ``\\xNN`` for the rest."""
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
