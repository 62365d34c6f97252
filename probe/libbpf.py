"""A thin ctypes binding over the system libbpf (``libbpf.so.1``), just what the probes need.

The loader is a straight line: ``BpfObject.open`` → ``set_rodata`` / ``resize_map`` →
``load`` → ``attach_all`` → map access and ring-buffer draining → ``close``. libbpf reports
failures as negative errno values; they become ``OSError`` inside this module and are
translated once, at this module's public boundary, into the probe's own exceptions::

    ProbeError                  anything the kernel side refused
    ├── ProbeLoadError          open, configure or load failed (message carries the verifier log)
    ├── ProbeAttachError        one program could not be attached ("attach tp/syscalls/...")
    └── ProbeMapError           a map lookup, update or ring-buffer setup failed

Each is raised ``from`` the ``OSError`` that carries the errno. libbpf's own log is routed into
the ``kubesight.probe.libbpf`` logger (debug messages at DEBUG).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("kubesight.probe.libbpf")

__all__ = [
    "BpfObject",
    "ProbeAttachError",
    "ProbeError",
    "ProbeLoadError",
    "ProbeMapError",
    "RingReader",
    "kernel_has_kfunc",
    "num_possible_cpus",
]


class ProbeError(Exception):
    """The kernel side of the probe could not be set up or used."""


class ProbeLoadError(ProbeError):
    """Opening, configuring or loading a BPF object failed; the message has the verifier log."""


class ProbeAttachError(ProbeError):
    """Attaching one BPF program failed; the message names its section."""


class ProbeMapError(ProbeError):
    """A BPF map operation failed."""


_c_void_p = ctypes.c_void_p
_lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_open_file = _fn("bpf_object__open_file", _c_void_p, ctypes.c_char_p, _c_void_p)
_obj_load = _fn("bpf_object__load", ctypes.c_int, _c_void_p)
_obj_close = _fn("bpf_object__close", None, _c_void_p)
_obj_btf = _fn("bpf_object__btf", _c_void_p, _c_void_p)
_find_map = _fn("bpf_object__find_map_by_name", _c_void_p, _c_void_p, ctypes.c_char_p)
_next_prog = _fn("bpf_object__next_program", _c_void_p, _c_void_p, _c_void_p)
_prog_section = _fn("bpf_program__section_name", ctypes.c_char_p, _c_void_p)
_prog_attach = _fn("bpf_program__attach", _c_void_p, _c_void_p)
_attach_cgroup = _fn("bpf_program__attach_cgroup", _c_void_p, _c_void_p, ctypes.c_int)
_prog_fd = _fn("bpf_program__fd", ctypes.c_int, _c_void_p)
_prog_name = _fn("bpf_program__name", ctypes.c_char_p, _c_void_p)
_prog_set_attach_type = _fn("bpf_program__set_expected_attach_type", ctypes.c_int, _c_void_p,
                            ctypes.c_int)
_find_prog = _fn("bpf_object__find_program_by_name", _c_void_p, _c_void_p, ctypes.c_char_p)


class _UprobeOpts(ctypes.Structure):
    """struct bpf_uprobe_opts (libbpf ≥ 1.0; later fields are zero = default)."""

    _fields_ = [("sz", ctypes.c_size_t), ("ref_ctr_offset", ctypes.c_size_t),
                ("bpf_cookie", ctypes.c_uint64), ("retprobe", ctypes.c_bool),
                ("func_name", ctypes.c_char_p)]


_attach_uprobe = _fn("bpf_program__attach_uprobe_opts", _c_void_p, _c_void_p, ctypes.c_int,
                     ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_UprobeOpts))
_link_destroy = _fn("bpf_link__destroy", ctypes.c_int, _c_void_p)


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf >= 0.7)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", _c_void_p), ("data_out", _c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", _c_void_p), ("ctx_out", _c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


BPF_F_TEST_RUN_ON_CPU = 1
_test_run = _fn("bpf_prog_test_run_opts", ctypes.c_int, ctypes.c_int,
                ctypes.POINTER(_TestRunOpts))
_map_fd = _fn("bpf_map__fd", ctypes.c_int, _c_void_p)
_map_set_max_entries = _fn("bpf_map__set_max_entries", ctypes.c_int, _c_void_p, ctypes.c_uint32)
_map_reuse_fd = _fn("bpf_map__reuse_fd", ctypes.c_int, _c_void_p, ctypes.c_int)
_map_set_value_size = _fn("bpf_map__set_value_size", ctypes.c_int, _c_void_p, ctypes.c_uint32)
_map_max_entries = _fn("bpf_map__max_entries", ctypes.c_uint32, _c_void_p)
_map_value_size = _fn("bpf_map__value_size", ctypes.c_uint32, _c_void_p)
_map_initial_value = _fn(
    "bpf_map__initial_value", _c_void_p, _c_void_p, ctypes.POINTER(ctypes.c_size_t)
)
_update_elem = _fn("bpf_map_update_elem", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p,
                   ctypes.c_uint64)
_lookup_elem = _fn("bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p)
_delete_elem = _fn("bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, _c_void_p)
_get_next_key = _fn("bpf_map_get_next_key", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p)
_lookup_batch = _fn("bpf_map_lookup_batch", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p,
                    _c_void_p, _c_void_p, ctypes.POINTER(ctypes.c_uint32), _c_void_p)
_num_cpus = _fn("libbpf_num_possible_cpus", ctypes.c_int)
_btf_find = _fn("btf__find_by_name_kind", ctypes.c_int, _c_void_p, ctypes.c_char_p,
                ctypes.c_uint32)
_btf_type = _fn("btf__type_by_id", _c_void_p, _c_void_p, ctypes.c_uint32)
_btf_name = _fn("btf__name_by_offset", ctypes.c_char_p, _c_void_p, ctypes.c_uint32)
_btf_load_vmlinux = _fn("btf__load_vmlinux_btf", _c_void_p)
_btf_free = _fn("btf__free", None, _c_void_p)

_SAMPLE_CB = ctypes.CFUNCTYPE(ctypes.c_int, _c_void_p, _c_void_p, ctypes.c_size_t)
_rb_new = _fn("ring_buffer__new", _c_void_p, ctypes.c_int, _SAMPLE_CB, _c_void_p, _c_void_p)
_rb_consume = _fn("ring_buffer__consume", ctypes.c_int, _c_void_p)
_rb_free = _fn("ring_buffer__free", None, _c_void_p)

_BTF_KIND_ENUM = 6
_BTF_KIND_FUNC = 12
_BTF_KIND_DATASEC = 15
_ENOTSUPP = 524  # the kernel's own "operation not supported" (not in errno)


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("size_or_type", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32),
                ("size", ctypes.c_uint32)]


# --- libbpf's log → Python logging; load() also collects it for the error message ----------

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _c_void_p)
_vsnprintf = _libc.vsnprintf
_vsnprintf.restype = ctypes.c_int
_vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _c_void_p]
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}  # enum libbpf_print_level
_capture = threading.local()


def _print(level: int, fmt: bytes, va_list: int) -> int:
    # The verifier log can be long; libbpf prints it in one call.
    buf = ctypes.create_string_buffer(1 << 20)
    n = _vsnprintf(buf, len(buf), fmt, va_list)
    text = buf.raw[: max(0, min(n, len(buf) - 1))].decode(errors="replace")
    sink = getattr(_capture, "lines", None)
    if sink is not None and level < 2:
        sink.append(text)
    log.log(_LEVELS.get(level, logging.DEBUG), "%s", text.rstrip())
    return 0


_print_cb = _PRINT_FN(_print)  # kept alive for the process lifetime
_fn("libbpf_set_print", _c_void_p, _PRINT_FN)(_print_cb)


def _check(rc: int, what: str) -> int:
    """libbpf ≥1.0 returns -errno; turn it into OSError."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ptr


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on a hybrid host), or None."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4].replace("\\040", " "))
    return None


def num_possible_cpus() -> int:
    return _check(_num_cpus(), "libbpf_num_possible_cpus")


def kernel_has_kfunc(name: str) -> bool:
    """Whether the running kernel's BTF has the kfunc ``name``: what a program's ``__weak``
    declaration of it resolves against at load time (kfuncs of modules are not looked at)."""
    btf = _btf_load_vmlinux()
    if not btf:
        return False
    try:
        return int(_btf_find(btf, name.encode(), _BTF_KIND_FUNC)) > 0
    finally:
        _btf_free(btf)


def kernel_has_enum_value(enum: str, value: str) -> bool:
    """Whether the running kernel's BTF has ``value`` in ``enum`` (a UAPI feature test: an
    attach type this kernel knows)."""
    btf = _btf_load_vmlinux()
    if not btf:
        return False
    try:
        type_id = int(_btf_find(btf, enum.encode(), _BTF_KIND_ENUM))
        if type_id <= 0:
            return False
        base = _btf_type(btf, type_id)
        head = _BtfType.from_address(base)
        for i in range(head.info & 0xFFFF):  # vlen members: struct btf_enum {name_off; val}
            name_off = ctypes.c_uint32.from_address(base + ctypes.sizeof(_BtfType) + 8 * i)
            if _btf_name(btf, name_off.value) == value.encode():
                return True
        return False
    finally:
        _btf_free(btf)


# UAPI constants (include/uapi/linux/bpf.h), for the one bpf(2) call libbpf 1.1 cannot make.
_SYS_BPF = 321  # x86-64
_BPF_LINK_CREATE = 28
BPF_TRACE_UPROBE_MULTI = 48
_BPF_F_UPROBE_MULTI_RETURN = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def kernel_has_uprobe_multi() -> bool:
    """uprobe_multi links (Linux >= 6.6) need only CAP_BPF and CAP_PERFMON; a uprobe made
    through perf_event_open needs CAP_SYS_ADMIN."""
    return kernel_has_enum_value("bpf_attach_type", "BPF_TRACE_UPROBE_MULTI")


class BpfObject:
    """One opened BPF object file: configure it, load it, attach its programs, use its maps."""

    def __init__(self, path: Path, obj: int) -> None:
        self.path = path
        self._obj: int | None = obj
        self._links: list[tuple[str, int]] = []
        self._link_fds: list[tuple[str, int]] = []  # links made with bpf(2) directly
        self.uprobe_multi = False  # see use_uprobe_multi
        self.loaded = False

    @classmethod
    def open(cls, path: Path) -> BpfObject:
        try:
            obj = _check_ptr(_open_file(os.fsencode(path), None), f"open {path}")
        except OSError as exc:
            hint = (" (the BPF objects are built by `make bpf`; KUBESIGHT_BPF_DIR says where "
                    "they are)" if exc.errno == errno.ENOENT else "")
            raise ProbeLoadError(f"open {path}: {os.strerror(exc.errno or errno.EINVAL)}"
                                 f"{hint}") from exc
        return cls(path, obj)

    # --- configure (before load) -----------------------------------------------------------

    def _map(self, name: str) -> int:
        ptr = _find_map(self._obj, name.encode())
        if not ptr:
            raise ProbeLoadError(f"{self.path.name}: no map named {name!r}")
        return int(ptr)

    def rodata_offsets(self, section: str = ".rodata") -> dict[str, tuple[int, int]]:
        """Variable name → (offset, size) in a data section, read from the object's BTF."""
        btf = _obj_btf(self._obj)
        sec_id = _btf_find(btf, section.encode(), _BTF_KIND_DATASEC) if btf else -1
        if sec_id < 0:
            raise ProbeLoadError(f"{self.path.name}: no BTF for section {section}")
        sec = _BtfType.from_address(_btf_type(btf, sec_id))
        vlen = sec.info & 0xFFFF
        infos = (_BtfVarSecinfo * vlen).from_address(
            _btf_type(btf, sec_id) + ctypes.sizeof(_BtfType)
        )
        out = {}
        for info in infos:
            var = _BtfType.from_address(_btf_type(btf, info.type))
            out[_btf_name(btf, var.name_off).decode()] = (info.offset, info.size)
        return out

    def set_rodata(self, values: dict[str, bytes]) -> None:
        """Write `const volatile` variables (raw little-endian bytes) before load."""
        offsets = self.rodata_offsets()
        size = ctypes.c_size_t()
        base = _map_initial_value(self._map(".rodata"), ctypes.byref(size))
        if not base:
            raise ProbeLoadError(f"{self.path.name}: .rodata has no initial value")
        for name, raw in values.items():
            if name not in offsets:
                raise ProbeLoadError(f"{self.path.name}: no const volatile {name!r}")
            off, width = offsets[name]
            if len(raw) != width or off + width > size.value:
                raise ProbeLoadError(f"{name}: expected {width} bytes, got {len(raw)}")
            ctypes.memmove(base + off, raw, width)

    def resize_map(self, name: str, *, max_entries: int | None = None,
                   value_size: int | None = None) -> None:
        m = self._map(name)
        try:
            if max_entries is not None:
                _check(_map_set_max_entries(m, max_entries), f"{name}: set_max_entries")
            if value_size is not None:
                _check(_map_set_value_size(m, value_size), f"{name}: set_value_size")
        except OSError as exc:
            raise ProbeLoadError(str(exc)) from exc

    def reuse_map(self, name: str, fd: int) -> None:
        """Before load: map ``name`` is the existing map ``fd`` (another object's, of the same
        type, sizes and entries), not a new one."""
        try:
            _check(_map_reuse_fd(self._map(name), fd), f"{name}: reuse fd {fd}")
        except OSError as exc:
            raise ProbeLoadError(str(exc)) from exc

    # --- load and attach -------------------------------------------------------------------

    def use_uprobe_multi(self) -> None:
        """Before load: the uprobe programs attach as uprobe_multi links (a bpf(2) link on
        the file and offset), not through perf_event_open, which needs CAP_SYS_ADMIN for a
        uprobe. Only where kernel_has_uprobe_multi()."""
        for section, prog in self.programs():
            if section.startswith(("uprobe", "uretprobe")):
                _check(_prog_set_attach_type(prog, BPF_TRACE_UPROBE_MULTI),
                       f"set attach type of {section}")
        self.uprobe_multi = True

    def load(self) -> None:
        _capture.lines = []
        try:
            _check(_obj_load(self._obj), f"load {self.path.name}")
        except OSError as exc:
            verifier_log = "".join(_capture.lines).strip()
            raise ProbeLoadError(f"{exc.strerror}\n{verifier_log}") from exc
        finally:
            _capture.lines = None
        self.loaded = True

    def programs(self) -> Iterator[tuple[str, int]]:
        """(section name, struct bpf_program *) for every program in the object."""
        prog = _next_prog(self._obj, None)
        while prog:
            yield _prog_section(prog).decode(), prog
            prog = _next_prog(self._obj, prog)

    def attach_all(self) -> list[str]:
        """Attach every program that names its hook in its section (tracepoints), and the
        cgroup programs at the root of the cgroup v2 hierarchy (every process on the host);
        uprobes name no binary and are attached one library at a time with
        ``attach_uprobe``. Returns the sections attached."""
        cgroups: Path | None = None
        for section, prog in self.programs():
            if section.startswith(("uprobe", "uretprobe")):
                continue
            if section == "raw_tp":
                continue  # no tracepoint named: run on demand (run_on_cpu), never attached
            try:
                if section.startswith("cgroup/"):
                    cgroups = cgroups or cgroup2_root()
                    link = self._attach_cgroup(prog, section, cgroups)
                else:
                    link = _check_ptr(_prog_attach(prog), f"attach {section}")
            except OSError as exc:
                raise ProbeAttachError(f"attach {section}: {exc}") from exc
            self._links.append((section, link))
        return [section for section, _ in self._links]

    @staticmethod
    def _attach_cgroup(prog: int, section: str, root: Path | None) -> int:
        if root is None:
            raise OSError(errno.ENOENT, "no cgroup v2 hierarchy is mounted (cgroup2 in "
                          "/proc/self/mountinfo)")
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:  # the link holds the cgroup: the fd is not needed after attach
            return _check_ptr(_attach_cgroup(prog, fd), f"attach {section} at {root}")
        finally:
            os.close(fd)

    def attach_uprobe(self, program: str, binary: str, function: str, *,
                      retprobe: bool = False) -> None:
        """Attach ``program`` to ``function`` of the ELF file ``binary`` in every process
        (uprobes are per file: processes started later that map it are covered too)."""
        prog = _find_prog(self._obj, program.encode())
        what = f"attach {'uretprobe' if retprobe else 'uprobe'} {program} {binary}:{function}"
        if not prog:
            raise ProbeAttachError(f"{what}: no such program")
        if self.uprobe_multi:
            self._attach_uprobe_multi(prog, binary, function, retprobe, what)
            return
        opts = _UprobeOpts(sz=ctypes.sizeof(_UprobeOpts), retprobe=retprobe,
                           func_name=function.encode())
        try:
            link = _check_ptr(_attach_uprobe(prog, -1, binary.encode(), 0, ctypes.byref(opts)),
                              what)
        except OSError as exc:
            raise ProbeAttachError(what) from exc
        self._links.append((f"{program}:{binary}", link))

    def _attach_uprobe_multi(self, prog: int, binary: str, function: str, retprobe: bool,
                             what: str) -> None:
        from .elf import ElfError, function_offset

        try:
            offset = function_offset(binary, function)
        except (OSError, ElfError) as exc:
            raise ProbeAttachError(f"{what}: {exc}") from exc
        if offset is None:
            raise ProbeAttachError(f"{what}: {function} is not exported there")
        path = ctypes.create_string_buffer(os.fsencode(binary))
        offsets = (ctypes.c_uint64 * 1)(offset)
        attr = ctypes.create_string_buffer(64)  # union bpf_attr, link_create.uprobe_multi
        struct.pack_into("<IIII", attr, 0, _prog_fd(prog), 0, BPF_TRACE_UPROBE_MULTI, 0)
        struct.pack_into("<QQQQIII", attr, 16, ctypes.addressof(path), ctypes.addressof(offsets),
                         0, 0, 1, _BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, 0)
        fd = _libc.syscall(_SYS_BPF, _BPF_LINK_CREATE, attr, len(attr))
        if fd < 0:
            err = ctypes.get_errno()
            raise ProbeAttachError(f"{what}: {os.strerror(err)}") from OSError(err, what)
        self._link_fds.append((f"{_prog_name(prog).decode()}:{binary}", int(fd)))

    def run_on_cpu(self, program: str, cpu: int) -> int:
        """Run ``program`` (a raw_tp program, not attached) once on ``cpu`` with
        BPF_PROG_TEST_RUN (an IPI when it is another CPU); returns its return value."""
        return self._test_run(program, f"on {cpu}", flags=BPF_F_TEST_RUN_ON_CPU, cpu=cpu)

    def run(self, program: str, *args: int) -> int:
        """Run ``program`` (a raw_tp program, not attached) once here with BPF_PROG_TEST_RUN,
        its arguments ``args`` (u64 each); returns its return value."""
        ctx = (ctypes.c_uint64 * len(args))(*args)
        return self._test_run(program, "", ctx_in=ctypes.addressof(ctx),
                              ctx_size_in=ctypes.sizeof(ctx))

    def _test_run(self, program: str, where: str, **opts: int) -> int:
        prog = _check_ptr(_find_prog(self._obj, program.encode()), f"find program {program}")
        run = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), **opts)
        _check(_test_run(_prog_fd(prog), ctypes.byref(run)), f"test run {program} {where}".strip())
        return int(run.retval)

    def program_fds(self) -> dict[str, int]:
        return {section: _prog_fd(prog) for section, prog in self.programs()}

    # --- maps ------------------------------------------------------------------------------

    def map_fd(self, name: str) -> int:
        return int(_map_fd(self._map(name)))

    def map_max_entries(self, name: str) -> int:
        return int(_map_max_entries(self._map(name)))

    def map_update(self, name: str, key: bytes, value: bytes, flags: int = 0) -> None:
        """``flags``: BPF_ANY (0), BPF_NOEXIST (1) or BPF_EXIST (2)."""
        try:
            _check(_update_elem(self.map_fd(name), key, value, flags), f"update {name}")
        except OSError as exc:
            raise ProbeMapError(str(exc)) from exc

    def bit(self, name: str, index: int) -> bool:
        """Bit ``index`` of a bitmap map: u32 keys, u64 words of 64 bits."""
        word = self.map_lookup(name, (index // 64).to_bytes(4, "little"), 8)
        return bool(int.from_bytes(word or bytes(8), "little") >> index % 64 & 1)

    def set_bit(self, name: str, index: int, on: bool) -> None:
        """Read, change, write back one word: not atomic against programs writing it."""
        key = (index // 64).to_bytes(4, "little")
        word = int.from_bytes(self.map_lookup(name, key, 8) or bytes(8), "little")
        word = word | 1 << index % 64 if on else word & ~(1 << index % 64)
        self.map_update(name, key, word.to_bytes(8, "little"))

    def map_delete(self, name: str, key: bytes) -> None:
        rc = _delete_elem(self.map_fd(name), key)
        if rc < 0 and -rc != errno.ENOENT:
            raise ProbeMapError(f"delete {name}: {os.strerror(-rc)}") from OSError(-rc, name)

    def map_lookup(self, name: str, key: bytes, value_size: int) -> bytes | None:
        """Raw value bytes, or None if absent. Per-CPU maps: value_size covers all CPUs,
        each slot rounded up to 8 bytes."""
        buf = ctypes.create_string_buffer(value_size)
        rc = _lookup_elem(self.map_fd(name), key, buf)
        if rc < 0:
            if -rc == errno.ENOENT:
                return None
            raise ProbeMapError(f"lookup {name}: {os.strerror(-rc)}") from OSError(-rc, name)
        return buf.raw

    def map_items(self, name: str, key_size: int, value_size: int,
                  chunk: int = 1024) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map now, as raw bytes (not per-CPU maps).

        A live map has no consistent snapshot: entries added or deleted meanwhile may be
        missed. One ``bpf_map_lookup_batch`` per ``chunk`` entries; kernels without batch
        operations for the map type fall back to ``get_next_key`` + lookup per entry.
        """
        fd = self.map_fd(name)
        try:
            return self._items_batched(fd, key_size, value_size, chunk)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, _ENOTSUPP, errno.EOPNOTSUPP):
                raise ProbeMapError(f"lookup_batch {name}: {exc.strerror}") from exc
        return self._items_one_by_one(fd, name, key_size, value_size)

    @staticmethod
    def _items_batched(fd: int, key_size: int, value_size: int,
                       chunk: int) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        token = ctypes.create_string_buffer(max(8, key_size))
        next_token = ctypes.create_string_buffer(max(8, key_size))
        keys = ctypes.create_string_buffer(key_size * chunk)
        values = ctypes.create_string_buffer(value_size * chunk)
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            rc = _lookup_batch(fd, None if first else token, next_token, keys, values,
                               ctypes.byref(count), None)
            if rc < 0 and -rc == errno.ENOSPC:
                raise OSError(errno.EINVAL, "a hash bucket holds more than one chunk")
            if rc < 0 and -rc != errno.ENOENT:
                raise OSError(-rc, os.strerror(-rc))
            kraw, vraw = keys.raw, values.raw
            out.extend((kraw[i * key_size:(i + 1) * key_size],
                        vraw[i * value_size:(i + 1) * value_size]) for i in range(count.value))
            if rc < 0:  # ENOENT: that was the last chunk
                return out
            ctypes.memmove(token, next_token, len(token))
            first = False

    def _items_one_by_one(self, fd: int, name: str, key_size: int,
                          value_size: int) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        key = ctypes.create_string_buffer(key_size)
        value = ctypes.create_string_buffer(value_size)
        prev: Any = None
        while _get_next_key(fd, prev, key) == 0:
            if _lookup_elem(fd, key, value) == 0:  # deleted meanwhile: skip it
                out.append((key.raw, value.raw))
            prev = ctypes.create_string_buffer(key.raw, key_size)
        return out

    # --- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Detach every link, then free the object (and with it programs and maps)."""
        while self._links:
            section, link = self._links.pop()
            if _link_destroy(link) < 0:
                log.warning("detach %s failed", section)
        while self._link_fds:
            os.close(self._link_fds.pop()[1])
        if self._obj:
            _obj_close(self._obj)
            self._obj = None


class _DrainLib:
    """libksdrain.so (bpf/drain.c): copies every available record in one C call, or groups
    the l7 probe's records per connection as encoded msgpack events straight from the ring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path), use_errno=True)
        self.open = lib.ks_ring_open
        self.open.restype = _c_void_p
        self.open.argtypes = [ctypes.c_int, ctypes.c_size_t]
        self.close = lib.ks_ring_close
        self.close.restype = None
        self.close.argtypes = [_c_void_p]
        self.drain = lib.ks_ring_drain
        self.drain.restype = ctypes.c_size_t
        self.drain.argtypes = [_c_void_p, _c_void_p, ctypes.c_size_t,
                               ctypes.POINTER(ctypes.c_uint64)]
        self.group = lib.ks_ring_group
        self.group.restype = ctypes.c_long
        self.group.argtypes = [_c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32,
                               _c_void_p, ctypes.c_size_t, _c_void_p, ctypes.c_size_t,
                               ctypes.POINTER(ctypes.c_uint64)]
        self.pending = lib.ks_ring_pending
        self.pending.restype = ctypes.c_size_t
        self.pending.argtypes = [_c_void_p]
        # sizeof(struct ks_group), then its field offsets (tests/probe/test_layout.py).
        self.group_layout = (ctypes.c_uint32 * 8).in_dll(lib, "ks_group_layout")


class RingReader:
    """Drains a BPF ring buffer in batches.

    ``drain(on_batch)`` calls ``on_batch(buf, nbytes)`` with records laid out as
    ``[u32 length][record]`` back to back, until the ring is empty. With libksdrain.so this is
    one C call per batch; without it, libbpf's ring_buffer__consume with a ctypes callback
    per record (about half the rate) fills the same layout.

    ``group_into`` (libksdrain.so only, l7 records) groups and encodes records per connection
    straight from the ring, without the intermediate copy ``drain`` makes.
    """

    def __init__(self, map_fd: int, size: int, drain_so: Path | None,
                 batch_bytes: int = 4 << 20) -> None:
        self._batch_bytes = batch_bytes
        self._buf: Any = None  # drain()'s output, allocated on its first call
        self._view = memoryview(b"")
        self._ring: int | None = None
        self._rb: int | None = None
        self._lib: _DrainLib | None = None
        if drain_so is not None and drain_so.exists():
            self._lib = _DrainLib(drain_so)
            try:
                self._ring = _check_ptr(self._lib.open(map_fd, size), "mmap ring buffer")
            except OSError as exc:
                raise ProbeMapError(str(exc)) from exc
            self.mode = "c-batch"
        else:
            self._chunks: list[bytes] = []
            self._cb = _SAMPLE_CB(self._on_sample)
            try:
                self._rb = _check_ptr(_rb_new(map_fd, self._cb, None, None), "ring_buffer__new")
            except OSError as exc:
                raise ProbeMapError(str(exc)) from exc
            self.mode = "ctypes-callback"

    @property
    def drain_library(self) -> tuple[Path, int] | None:
        """The libksdrain.so file the ring is open through and its struct ks_ring *, for
        callers binding more of that library's calls (probe/l7.py GroupedDrain); None on the
        ctypes-callback path."""
        if self._lib is None or self._ring is None:
            return None
        return self._lib.path, self._ring

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        self._chunks.append(size.to_bytes(4, "little") + ctypes.string_at(data, size))
        return 0

    def drain(self, on_batch: Callable[[memoryview, int], None]) -> int:
        """Hand every available record to on_batch; returns the number of records."""
        total = 0
        if self._lib is not None:
            if self._buf is None:
                self._buf = ctypes.create_string_buffer(self._batch_bytes)
                self._view = memoryview(self._buf).cast("B")
            nrec = ctypes.c_uint64()
            while True:
                used = self._lib.drain(self._ring, self._buf, len(self._buf), ctypes.byref(nrec))
                if not used:
                    return total
                total += nrec.value
                on_batch(self._view, used)
        n = int(_rb_consume(self._rb))
        if n < 0:
            raise ProbeMapError(f"ring_buffer__consume: {os.strerror(-n)}")
        if self._chunks:
            joined = b"".join(self._chunks)
            self._chunks.clear()
            on_batch(memoryview(joined), len(joined))
        return n

    def pending(self) -> int | None:
        """Bytes committed to the ring and not drained yet (None without libksdrain.so)."""
        if self._lib is None or self._ring is None:
            return None
        return int(self._lib.pending(self._ring))

    @property
    def can_group(self) -> bool:
        return self._lib is not None

    def group_into(self, groups: Any, groups_cap: int, data: Any, data_cap: int, *,
                   offset_ns: int, max_events: int, max_bytes: int) -> tuple[int, int]:
        """One ks_ring_group call (bpf/drain.c): group and encode the committed records at the
        head of the ring into ``groups`` (``groups_cap`` struct ks_group) and ``data``, then
        hand their space back to the kernel. Returns (groups written, events encoded); 0 events
        means the ring is empty (or its head is still being written)."""
        assert self._lib is not None
        nrec = ctypes.c_uint64()
        n = self._lib.group(self._ring, offset_ns, max_events, max_bytes, groups, groups_cap,
                            data, data_cap, ctypes.byref(nrec))
        if n < 0:
            err = ctypes.get_errno()
            raise ProbeError(f"ks_ring_group: {os.strerror(err)}") from OSError(
                err, os.strerror(err))
        return int(n), nrec.value

    def close(self) -> None:
        if self._ring is not None and self._lib is not None:
            self._lib.close(self._ring)
            self._ring = None
        if self._rb is not None:
            _rb_free(self._rb)
            self._rb = None
