"""Where a shared library's exported function lives in its file: what a uprobe is placed at.

libbpf resolves a function name for its own uprobe attach, but not for a uprobe_multi link
made here (the system libbpf, 1.1, has no API for that), so ``function_offset`` reads the
ELF's dynamic symbol table itself: the symbol's address, less its section's address, plus the
section's offset in the file. 64-bit little-endian ELF only (the BPF objects are built for
x86-64).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_SHT_DYNSYM = 11
_STT_FUNC = 2
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym


class ElfError(ValueError):
    pass


def function_offset(path: Path | str, name: str) -> int | None:
    """File offset of the defined function ``name`` in ``path``'s dynamic symbols; None when
    the library does not export it. Raises ElfError for a file that is not a 64-bit
    little-endian ELF, OSError when it cannot be read."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ElfError(f"{path}: not a 64-bit little-endian ELF file")
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        if shentsize != _SHDR.size or shoff + shnum * shentsize > len(data):
            raise ElfError(f"{path}: section headers out of bounds")
        sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        want = name.encode()
        for _, sh_type, _, _, sym_off, sym_size, link, _, _, _ in sections:
            if sh_type != _SHT_DYNSYM or link >= shnum:
                continue
            strtab = sections[link][4]
            for off in range(sym_off, min(sym_off + sym_size, len(data)) - _SYM.size + 1,
                             _SYM.size):
                st_name, st_info, _, st_shndx, st_value, _ = _SYM.unpack_from(data, off)
                if st_info & 0xF != _STT_FUNC or not st_shndx or st_shndx >= shnum:
                    continue  # not a function, or only imported here
                start = strtab + st_name
                if data[start:start + len(want) + 1] != want + b"\0":
                    continue
                _, _, _, addr, file_off, _, _, _, _, _ = sections[st_shndx]
                return int(st_value - addr + file_off)
        return None
