"""The generated cffi module matches the C declarations, and loading it parses no C.

``dmtools/_ffi/_libdm.py`` is what ``python -m dmtools._ffi.build`` makes of ``cdef.py``; a
declaration edited without regenerating it would bind libdm with stale layouts.
"""

from __future__ import annotations

import re
import subprocess
import sys

from dmtools._ffi import build

#: cffi stamps the module with the version of the format it wrote; another cffi may write another.
_VERSION = re.compile(r"_version = 0x[0-9a-fA-F]+")


def test_generated_module_is_up_to_date() -> None:
    with open(build.PATH, encoding="ascii") as f:
        committed = f.read()
    assert _VERSION.sub("", committed) == _VERSION.sub("", build.generate()), (
        "dmtools/_ffi/_libdm.py is stale: run `python -m dmtools._ffi.build`"
    )


def test_loading_the_binding_parses_no_c() -> None:
    """``dmtools._ffi`` builds its types from the generated module: pycparser (cffi's C parser,
    most of the kernel backend's start-up) is never imported, and the types are libdm's."""
    probe = ("import sys, dmtools._ffi as f; "
             "print(f.ffi.sizeof('struct dm_info'), 'pycparser' in sys.modules, 'cffi.cparser' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["48", "False", "False"]  # the 12-field struct dm_info of DM_1_02_97
