"""probe/elf.py against files whose answers are known another way."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from kubesight.probe.elf import ElfError, function_offset

from .test_tls import _system_libssl


def _nm_and_sections(lib: Path, name: str) -> int:
    """The same offset from binutils: nm's address, mapped through readelf's section table."""
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) not installed")
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                        text=True, check=True).stdout
    addr = next(int(line.split()[0], 16) for line in nm.splitlines()
                if line.split()[-1] in (name, f"{name}@@OPENSSL_3.0.0"))
    sections = subprocess.run(["readelf", "-SW", str(lib)], capture_output=True, text=True,
                              check=True).stdout
    for line in sections.splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 5 and fields[0].startswith("[") and fields[2] == "PROGBITS":
            start, off, size = (int(fields[i], 16) for i in (3, 4, 5))
            if start <= addr < start + size:
                return addr - start + off
    raise AssertionError(f"{name} at {addr:#x} is in no PROGBITS section")


@pytest.mark.parametrize("function", ["SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex"])
def test_exported_functions_are_where_binutils_says(function: str) -> None:
    lib = _system_libssl()
    assert function_offset(lib, function) == _nm_and_sections(lib, function)


def test_a_function_the_library_only_imports_or_lacks_is_none() -> None:
    lib = _system_libssl()
    assert function_offset(lib, "SSL_no_such_function") is None
    assert function_offset(lib, "memcpy") is None  # libssl calls it; libc defines it


def test_what_is_not_an_elf_file_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "libssl.so.3"
    text.write_text("INPUT(-lssl)\n")  # a linker script, as some distributions ship
    with pytest.raises(ElfError, match="not a 64-bit little-endian ELF"):
        function_offset(text, "SSL_write")
